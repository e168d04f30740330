"""Modality Worklist and Unified Procedure Step over DIMSE.

Small handlers bound like the others (``(evt.EVT_X, handler, [context])``): they read
the request, call the archive's :class:`~storage.workitems.WorkitemStore`, and answer
with the status the store's decision names. :class:`EventReporter` delivers UPS events
(N-EVENT-REPORT) to subscribed AEs listed in ``[[peers]]``.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Iterator

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom import AE, evt
from pynetdicom.events import Event

from config import Settings
from storage import ArchiveError, WorkitemError
from storage.workitem_model import OPEN_STATES, SPS_ITEM_KEYS, UPS_EVENT_SOP_CLASS, WorkitemEvent
from storage.workitems import WorkitemStore

from . import handlers as h
from .statuses import FIND_STATUS, status_for

log = logging.getLogger("dicomnode.worklist")

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = UPS_EVENT_SOP_CLASS
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
UPS_SOP_CLASSES = (UPS_PUSH, UPS_WATCH, UPS_PULL, UPS_EVENT, UPS_QUERY)
WORKLIST_SOP_CLASSES = (MODALITY_WORKLIST_FIND, *UPS_SOP_CLASSES)

# N-ACTION Action Type IDs of the UPS SOP classes (PS3.4 CC.2.1, CC.2.2, CC.2.3)
CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL = 1, 2, 3, 4, 5
UNKNOWN_RECEIVING_AE = 0xC308
NO_SUCH_ACTION = 0x0123
INVALID_ATTRIBUTE_VALUE = 0x0106
_SKIP = {"SpecificCharacterSet", "QueryRetrieveLevel"}


def _store(ctx: h.NodeContext) -> WorkitemStore:
    return ctx.archive.workitems


def _failure(ctx: h.NodeContext, event: Event, service: str, exc: ArchiveError) -> int:
    status = exc.status if isinstance(exc, WorkitemError) else status_for(exc, FIND_STATUS)
    peer = ctx.peer_of(event)
    peer.failures[f"{service} 0x{status:04X}"] += 1
    log.warning("%s from %s@%s refused (0x%04X): %s", service, peer.calling_ae, peer.address, status, exc.message)
    return status


# ---------------------------------------------------------------- C-FIND


def handle_find(event: Event, ctx: h.NodeContext) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND for every information model: worklist and UPS here, query/retrieve in
    :func:`node.handlers.handle_find`."""
    sop_class = event.request.AffectedSOPClassUID
    if sop_class == MODALITY_WORKLIST_FIND:
        return handle_worklist_find(event, ctx)
    if sop_class in UPS_SOP_CLASSES:
        return handle_ups_find(event, ctx)
    return h.handle_find(event, ctx)


def worklist_keys(identifier: Dataset) -> dict[str, str]:
    """Match keys of an MWL identifier: top-level keys and those of its Scheduled
    Procedure Step Sequence item, flattened."""
    keys = _keys(identifier)
    steps = identifier.get("ScheduledProcedureStepSequence")
    if steps:
        keys.update({k: v for k, v in _keys(steps[0]).items() if k in SPS_ITEM_KEYS})
    return keys


def _keys(ds: Dataset) -> dict[str, str]:
    keys = {}
    for elem in ds:
        if elem.tag.is_private or elem.VR == "SQ" or elem.keyword in _SKIP or not elem.keyword:
            continue
        value = elem.value
        if value is None:
            keys[elem.keyword] = ""
        elif isinstance(value, (list, tuple, MultiValue)):
            keys[elem.keyword] = "\\".join(str(v) for v in value)
        else:
            keys[elem.keyword] = str(value)
    return keys


def handle_worklist_find(event: Event, ctx: h.NodeContext) -> Iterator[tuple[int, Dataset | None]]:
    peer = ctx.peer_of(event)
    peer.operations["C-FIND MWL"] += 1
    try:
        identifier = event.identifier
        matches = _store(ctx).find(
            worklist_keys(identifier), organizations=(peer.organization,), states=OPEN_STATES,
            is_cancelled=lambda: event.is_cancelled,
        )
        count = 0
        for item in matches:
            yield 0xFF00, answer(item.worklist_view(), identifier)
            count += 1
    except ArchiveError as exc:
        yield _failure(ctx, event, "C-FIND MWL", exc), None
        return
    if event.is_cancelled:
        yield 0xFE00, None
        return
    log.info("MWL C-FIND from %s@%s: %d match(es)", peer.calling_ae, peer.address, count)
    yield 0x0000, None


def handle_ups_find(event: Event, ctx: h.NodeContext) -> Iterator[tuple[int, Dataset | None]]:
    peer = ctx.peer_of(event)
    peer.operations["C-FIND UPS"] += 1
    try:
        identifier = event.identifier
        matches = _store(ctx).find(_keys(identifier), organizations=(peer.organization,),
                                   is_cancelled=lambda: event.is_cancelled)
        for item in matches:
            yield 0xFF00, answer(item.ups_view(), identifier)
    except ArchiveError as exc:
        yield _failure(ctx, event, "C-FIND UPS", exc), None
        return
    yield (0xFE00 if event.is_cancelled else 0x0000), None


def answer(full: Dataset, identifier: Dataset) -> Dataset:
    """The requested keys of ``full`` (empty where it has none); a sequence key with an
    item returns only that item's keys, an empty one the whole items."""
    out = Dataset()
    for elem in identifier:
        if elem.tag.is_private or elem.tag.group == 0x0002 or elem.keyword == "QueryRetrieveLevel":
            continue
        have = full.get(elem.tag)
        if have is None:
            out.add_new(elem.tag, dictionary_VR(elem.tag) if keyword_for_tag(elem.tag) else elem.VR, None)
            if elem.VR == "SQ":
                out[elem.tag].value = Sequence()
            continue
        if elem.VR == "SQ" and elem.value and len(elem.value[0]):
            out.add_new(elem.tag, "SQ", Sequence([answer(item, elem.value[0]) for item in have.value or []]))
        else:
            out.add(have)
    if "SpecificCharacterSet" in full:
        out.SpecificCharacterSet = full.SpecificCharacterSet
    return out


# ---------------------------------------------------------------- N-services


def handle_n_create(event: Event, ctx: h.NodeContext) -> tuple[int, Dataset | None]:
    peer = ctx.peer_of(event)
    peer.operations["N-CREATE"] += 1
    try:
        uid = event.request.AffectedSOPInstanceUID
        item = _store(ctx).create(event.attribute_list, peer.organization, uid=str(uid) if uid else None)
    except ArchiveError as exc:
        return _failure(ctx, event, "N-CREATE", exc), None
    return 0x0000, item.ups_view()


def handle_n_get(event: Event, ctx: h.NodeContext) -> tuple[int, Dataset | None]:
    peer = ctx.peer_of(event)
    peer.operations["N-GET"] += 1
    try:
        item = _store(ctx).get(str(event.request.RequestedSOPInstanceUID), (peer.organization,))
    except ArchiveError as exc:
        return _failure(ctx, event, "N-GET", exc), None
    view = item.ups_view()
    wanted = event.request.AttributeIdentifierList
    if not wanted:
        return 0x0000, view
    out = Dataset()
    for tag in wanted if isinstance(wanted, list) else [wanted]:
        if tag in view:
            out.add(view[tag])
    return 0x0000, out


def handle_n_set(event: Event, ctx: h.NodeContext) -> tuple[int, Dataset | None]:
    peer = ctx.peer_of(event)
    peer.operations["N-SET"] += 1
    try:
        changes = event.modification_list
        txn = str(changes.get("TransactionUID", "") or "") or None
        if "TransactionUID" in changes:
            del changes.TransactionUID
        item = _store(ctx).update(str(event.request.RequestedSOPInstanceUID), changes, txn, (peer.organization,))
    except ArchiveError as exc:
        return _failure(ctx, event, "N-SET", exc), None
    return 0x0000, item.ups_view()


def handle_n_action(event: Event, ctx: h.NodeContext) -> tuple[int, Dataset | None]:
    peer = ctx.peer_of(event)
    action = event.action_type
    peer.operations[f"N-ACTION {action}"] += 1
    uid = str(event.request.RequestedSOPInstanceUID)
    try:
        info = event.action_information
        if action == CHANGE_STATE:
            return _change_state(ctx, uid, info, peer.organization)
        if action == REQUEST_CANCEL:
            item, warning = _store(ctx).request_cancellation(
                uid, str(info.get("ReasonForCancellation", "") or ""),
                str(info.get("ContactDisplayName", "") or ""), (peer.organization,),
            )
            return warning or 0x0000, None
        if action in (SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL):
            return _subscription(ctx, event, uid, action, info, peer.organization), None
    except ArchiveError as exc:
        return _failure(ctx, event, f"N-ACTION {action}", exc), None
    log.warning("N-ACTION type %s from %s is not a UPS action", action, peer.calling_ae)
    return NO_SUCH_ACTION, None


def _change_state(ctx: h.NodeContext, uid: str, info: Dataset, org: str) -> tuple[int, Dataset]:
    item, warning = _store(ctx).change_state(
        uid, str(info.get("ProcedureStepState", "") or ""), str(info.get("TransactionUID", "") or "") or None,
        (org,),
    )
    reply = Dataset()
    reply.ProcedureStepState = item.state
    return warning or 0x0000, reply


def _subscription(ctx: h.NodeContext, event: Event, uid: str, action: int, info: Dataset, org: str) -> int:
    receiving = str(info.get("ReceivingAE", "") or "").strip()
    if not receiving or ctx.settings.peer(receiving) is None:
        log.warning("UPS subscription for %r refused (0xC308): list it in [[peers]] in ae.toml", receiving)
        ctx.peer_of(event).failures[f"N-ACTION {action} 0xC308"] += 1
        return UNKNOWN_RECEIVING_AE
    store = _store(ctx)
    if action == SUBSCRIBE:
        lock = str(info.get("DeletionLock", "FALSE") or "FALSE").strip().upper() == "TRUE"
        store.subscribe(receiving, uid, org, lock, (org,))
    else:  # unsubscribe, or suspend the global subscription (existing ones are kept)
        store.unsubscribe(receiving, uid if action == UNSUBSCRIBE else None, (org,))
    return 0x0000


# ---------------------------------------------------------------- event reports


class EventReporter:
    """Sends UPS N-EVENT-REPORTs to subscribed AEs on its own thread (an event-bus
    subscriber must return at once). Only AEs listed in ``[[peers]]`` get reports:
    their address comes from there."""

    def __init__(self, settings: Settings, store_events: Any) -> None:
        self.settings = settings
        self.events = store_events
        self._queue: queue.Queue[WorkitemEvent | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ups-event-reports", daemon=True)
        self._unsubscribe = None
        self.ae = AE(ae_title=settings.ae.title)
        self.ae.add_requested_context(UPS_EVENT)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10

    def start(self) -> None:
        self._unsubscribe = self.events.subscribe(WorkitemEvent, self._queue.put)
        self._thread.start()

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            self._queue.put(None)
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            for ae_title in event.recipients:
                peer = self.settings.peer(ae_title)
                if peer is None:
                    continue  # a WebSocket subscriber, or no longer configured
                try:
                    self._send(peer, event)
                except Exception:  # one unreachable subscriber never stops the others
                    log.exception("N-EVENT-REPORT to %s failed", ae_title)

    def _send(self, peer: Any, event: WorkitemEvent) -> None:
        assoc = self.ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, h.handle_conn_open)])
        if not assoc.is_established:
            log.warning("N-EVENT-REPORT: %s at %s:%d does not accept an association", peer.ae_title,
                        peer.host, peer.port)
            return
        try:
            status, _ = assoc.send_n_event_report(
                event.event_information(), event.event_type, UPS_EVENT, event.workitem_uid,
            )
            log.info("N-EVENT-REPORT type %d for %s to %s: 0x%04X", event.event_type, event.workitem_uid,
                     peer.ae_title, getattr(status, "Status", 0xFFFF))
        finally:
            assoc.release()
