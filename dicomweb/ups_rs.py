"""UPS-RS (PS3.18 section 11) at ``/dicomweb/workitems``: create, search, retrieve,
update, change state, request cancellation, subscriptions (global and per workitem), and
the WebSocket event channel at ``/dicomweb/subscribers/{aetitle}``.

Every route needs the ``worklist`` scope: the same workitems the seed 004 API and the
DIMSE worklist serve, so one scope governs them all.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import WSMsgType, web
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from storage import InvalidQuery
from storage.errors import InvalidWorkitem
from storage.workitem_model import GLOBAL_SUBSCRIPTION_UID, UPS_EVENT_SOP_CLASS, WorkitemEvent

from .auth import principal, requires
from .keys import ARCHIVE
from .workitems_api import dicom_json, in_thread, read_json

log = logging.getLogger("dicomnode.ups_rs")

routes = web.RouteTableDef()
BASE = "/dicomweb/workitems"
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_SEARCH_CONTROLS = {"limit", "offset", "includefield", "fuzzymatching"}


# ---------------------------------------------------------------- payloads


def parse_dataset(payload: Any) -> Dataset:
    """One dataset from a DICOM JSON body (an object, or an array holding one), with
    every tag known, every ``Value`` an array and every value valid for its VR."""
    if isinstance(payload, list):
        if len(payload) != 1:
            raise InvalidWorkitem(f"send exactly one workitem dataset, not {len(payload)}", status=0x0106)
        payload = payload[0]
    if not isinstance(payload, dict) or not payload:
        raise InvalidWorkitem("the body must be a DICOM JSON dataset (an object keyed by tags)", status=0x0106)
    _check_json(payload)
    try:
        ds = Dataset.from_json(payload)
    except Exception as exc:  # pydicom names the element it could not read
        raise InvalidWorkitem(f"the dataset cannot be read: {exc}", status=0x0106) from None
    return ds


def _check_json(payload: dict, path: str = "") -> None:
    for tag, element in payload.items():
        where = f"{path}{tag}"
        if not _TAG_RE.match(tag):
            keyword_hint = f" (use tag {tag_for_keyword(tag):08X})" if tag_for_keyword(tag) else ""
            raise InvalidWorkitem(f"{where} is not an 8-digit hex tag{keyword_hint}", status=0x0106, attribute=tag)
        group = int(tag[:4], 16)
        if group % 2 == 0 and keyword_for_tag(int(tag, 16)) == "":
            raise InvalidWorkitem(f"{where} is not a DICOM attribute this node knows", status=0x0106, attribute=tag)
        if not isinstance(element, dict) or not isinstance(element.get("vr"), str):
            raise InvalidWorkitem(f"{where} must be an object with a \"vr\"", status=0x0106, attribute=tag)
        if "Value" in element:
            if not isinstance(element["Value"], list):
                raise InvalidWorkitem(f"{where}: \"Value\" must be an array", status=0x0106, attribute=tag)
            if element["vr"] == "SQ":
                for i, item in enumerate(element["Value"]):
                    if not isinstance(item, dict):
                        raise InvalidWorkitem(f"{where} item {i} must be an object", status=0x0106, attribute=tag)
                    _check_json(item, f"{where}[{i}].")


def search_keys(query: Any) -> dict[str, str]:
    """``{keyword: value}`` from QIDO-style parameters named by keyword or tag."""
    keys = {}
    for name, value in query.items():
        if name in _SEARCH_CONTROLS:
            continue
        keyword = name
        if _TAG_RE.match(name):
            keyword = keyword_for_tag(int(name, 16))
        if not keyword or tag_for_keyword(keyword) is None:
            raise InvalidQuery(f"{name} is not a DICOM keyword or tag")
        keys[keyword] = value
    return keys


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise InvalidQuery(f"{name} must be a non-negative integer, not {text!r}")
    return int(text)


def _workitem_uid_from_query(request: web.Request) -> str | None:
    """PS3.18 puts the new workitem's UID as the bare query (``?1.2.3``)."""
    if "workitem" in request.query:
        return request.query["workitem"]
    for name, value in request.query.items():
        if not value and re.match(r"^[0-9.]+$", name):
            return name
    return None


def _transaction_uid_from_query(request: web.Request) -> str | None:
    for name, value in request.query.items():
        if name.lower() in ("transaction", "transactionuid"):
            return value
        if not value and re.match(r"^[0-9.]+$", name):
            return name
    return None


# ---------------------------------------------------------------- workitems


@routes.post(BASE)
@requires("worklist")
async def create(request: web.Request) -> web.Response:
    dataset = parse_dataset(await read_json(request))
    store = request.app[ARCHIVE].workitems
    uid = _workitem_uid_from_query(request) or str(dataset.get("SOPInstanceUID", "") or "") or None
    org = principal(request).storing_organization
    item = await in_thread(request, lambda: store.create(dataset, org, uid=uid))
    location = f"{request.scheme}://{request.host}{BASE}/{item.uid}"
    return web.Response(status=201, headers={"Location": location, "Content-Location": location})


@routes.get(BASE)
@requires("worklist")
async def search(request: web.Request) -> web.Response:
    keys = search_keys(request.query)
    limit, offset = _int_param(request, "limit"), _int_param(request, "offset") or 0
    store = request.app[ARCHIVE].workitems
    orgs = principal(request).organizations
    found = await in_thread(
        request, lambda: [w.ups_view().to_json_dict() for w in store.find(keys, orgs, limit=limit, offset=offset)]
    )
    if not found:
        return web.Response(status=204)
    return dicom_json(found)


@routes.get(BASE + "/{uid}")
@requires("worklist")
async def retrieve(request: web.Request) -> web.Response:
    store = request.app[ARCHIVE].workitems
    item = await in_thread(request, store.get, request.match_info["uid"], principal(request).organizations)
    return dicom_json([item.ups_view().to_json_dict()])


@routes.post(BASE + "/{uid}")
@requires("worklist")
async def update(request: web.Request) -> web.Response:
    changes = parse_dataset(await read_json(request))
    txn = _transaction_uid_from_query(request)
    if "TransactionUID" in changes:
        txn = txn or str(changes.TransactionUID)
        del changes.TransactionUID
    store = request.app[ARCHIVE].workitems
    uid, orgs = request.match_info["uid"], principal(request).organizations
    await in_thread(request, lambda: store.update(uid, changes, txn, orgs))
    return web.Response(status=200)


@routes.put(BASE + "/{uid}/state")
@requires("worklist")
async def change_state(request: web.Request) -> web.Response:
    body = parse_dataset(await read_json(request))
    state = str(body.get("ProcedureStepState", "") or "")
    txn = str(body.get("TransactionUID", "") or "") or None
    store = request.app[ARCHIVE].workitems
    uid, orgs = request.match_info["uid"], principal(request).organizations
    item, warning = await in_thread(request, lambda: store.change_state(uid, state, txn, orgs))
    headers = {"Warning": f"299 dicomnode: 0x{warning:04X} workitem is already {item.state}"} if warning else {}
    return dicom_json(_state_reply(item.state, txn), headers=headers)


def _state_reply(state: str, txn: str | None) -> dict:
    ds = Dataset()
    ds.ProcedureStepState = state
    if txn:
        ds.TransactionUID = txn
    return ds.to_json_dict()


@routes.post(BASE + "/{uid}/cancelrequest")
@requires("worklist")
async def request_cancellation(request: web.Request) -> web.Response:
    reason, contact = "", ""
    if request.can_read_body:
        info = parse_dataset(await read_json(request))
        reason = str(info.get("ReasonForCancellation", "") or "")
        contact = str(info.get("ContactDisplayName", "") or "")
    store = request.app[ARCHIVE].workitems
    uid, orgs = request.match_info["uid"], principal(request).organizations
    _, warning = await in_thread(request, lambda: store.request_cancellation(uid, reason, contact, orgs))
    headers = {"Warning": f"299 dicomnode: 0x{warning:04X} workitem is already CANCELED"} if warning else {}
    return web.Response(status=202, headers=headers)


# ---------------------------------------------------------------- subscriptions


@routes.post(BASE + "/{uid}/subscribers/{aetitle}")
@requires("worklist")
async def subscribe(request: web.Request) -> web.Response:
    ae_title = _ae_title(request)
    lock = request.query.get("deletionlock", "false").lower() == "true"
    store = request.app[ARCHIVE].workitems
    who, uid = principal(request), request.match_info["uid"]
    await in_thread(
        request, lambda: store.subscribe(ae_title, uid, who.storing_organization, lock, who.organizations)
    )
    scheme = "wss" if request.scheme == "https" else "ws"
    channel = f"{scheme}://{request.host}/dicomweb/subscribers/{ae_title}"
    return web.Response(status=201, headers={"Content-Location": channel})


@routes.delete(BASE + "/{uid}/subscribers/{aetitle}")
@requires("worklist")
async def unsubscribe(request: web.Request) -> web.Response:
    ae_title = _ae_title(request)
    store = request.app[ARCHIVE].workitems
    await in_thread(request, store.unsubscribe, ae_title, request.match_info["uid"], principal(request).organizations)
    return web.Response(status=200)


@routes.post(BASE + "/" + GLOBAL_SUBSCRIPTION_UID + "/subscribers/{aetitle}/suspend")
@requires("worklist")
async def suspend_global(request: web.Request) -> web.Response:
    store = request.app[ARCHIVE].workitems
    await in_thread(request, store.unsubscribe, _ae_title(request), None, principal(request).organizations)
    return web.Response(status=200)


def _ae_title(request: web.Request) -> str:
    title = request.match_info["aetitle"].strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        raise InvalidQuery(f"{title!r} is not an AE title (1 to 16 printable characters, no backslash)")
    return title


# ---------------------------------------------------------------- event channel


class EventChannels:
    """Open WebSocket channels by subscriber AE title, each with its queue of event
    reports and the organizations whose workitems it may hear of (None: all). Workitem
    events arrive on the archive's threads and are handed to the event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, dict[asyncio.Queue, tuple[str, ...] | None]] = {}

    def on_event(self, event: WorkitemEvent) -> None:  # any thread
        if self.loop is not None and any(ae in self.queues for ae in event.recipients):
            self.loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: WorkitemEvent) -> None:
        message = event_message(event)
        for ae_title in event.recipients:
            for pending, organizations in self.queues.get(ae_title, {}).items():
                if organizations is None or event.organization in organizations:
                    pending.put_nowait(message)

    def open(self, ae_title: str, organizations: tuple[str, ...] | None = None) -> asyncio.Queue:
        pending: asyncio.Queue = asyncio.Queue()
        self.queues.setdefault(ae_title, {})[pending] = organizations
        return pending

    def close(self, ae_title: str, pending: asyncio.Queue) -> None:
        channel = self.queues.get(ae_title, {})
        channel.pop(pending, None)
        if not channel:
            self.queues.pop(ae_title, None)


def event_message(event: WorkitemEvent) -> dict:
    """The event report as DICOM JSON (PS3.18 section 11.13): the workitem, the event
    type and the event information."""
    ds = event.event_information()
    ds.AffectedSOPClassUID = UPS_EVENT_SOP_CLASS
    ds.AffectedSOPInstanceUID = event.workitem_uid
    ds.EventTypeID = event.event_type
    return ds.to_json_dict()


EVENT_CHANNELS = web.AppKey("ups_event_channels", EventChannels)


def setup(app: web.Application) -> None:
    """Own the event channels for the app's lifetime."""
    channels = EventChannels()
    app[EVENT_CHANNELS] = channels

    async def channels_ctx(app: web.Application):
        channels.loop = asyncio.get_running_loop()
        unsubscribe = app[ARCHIVE].events.subscribe(WorkitemEvent, channels.on_event)
        yield
        unsubscribe()
        channels.loop = None

    app.cleanup_ctx.append(channels_ctx)


@routes.get("/dicomweb/subscribers/{aetitle}")
@requires("worklist")
async def event_channel(request: web.Request) -> web.WebSocketResponse:
    """The event channel of a subscriber AE title: event reports are sent as DICOM
    JSON text messages for as long as the socket is open."""
    ae_title = _ae_title(request)
    channels = request.app[EVENT_CHANNELS]
    # opened before the handshake completes: no event is missed
    pending = channels.open(ae_title, principal(request).organizations)
    ws = web.WebSocketResponse(heartbeat=30)
    sender: asyncio.Task | None = None
    try:
        await ws.prepare(request)
        log.info("event channel for %s open from %s", ae_title, request.remote)

        async def send_reports() -> None:
            while True:
                await ws.send_json(await pending.get())

        sender = asyncio.create_task(send_reports())
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
    finally:
        channels.close(ae_title, pending)
        if sender is not None:
            sender.cancel()
    return ws
