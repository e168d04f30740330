"""Seed 004 worklist API: ``POST /workitems``, ``GET /workitems?patientID=``,
``DELETE /workitems/{studyInstanceUID}``, over the archive's workitem store.

Bodies are flat JSON objects of DICOM keywords; answers are DICOM JSON worklist
entries shaped as the seed shows (Scheduled Procedure Step Sequence and its item).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, TypeVar

from aiohttp import web

from storage import InvalidQuery, TooLarge
from storage.workitem_model import worklist_entry

from .auth import principal, requires
from .keys import ARCHIVE, EXECUTOR

routes = web.RouteTableDef()
T = TypeVar("T")

MAX_WORKITEM_BYTES = 1 << 20  # a workitem is a few kB; anything near this is not one


async def in_thread(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run an archive call on the app's thread pool, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], fn, *args)


async def read_json(request: web.Request, limit: int = MAX_WORKITEM_BYTES) -> Any:
    """The request's JSON body, refusing more than ``limit`` bytes (413) and anything
    that is not JSON (400) before any of it is used."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is {request.content_length} bytes; a workitem may have at most {limit}",
                       limit=limit)
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body.extend(chunk)
        if len(body) > limit:
            raise TooLarge(f"the body exceeds {limit} bytes, the most a workitem may have", limit=limit)
    if not body:
        raise InvalidQuery("the request has no body: send the workitem as JSON")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidQuery(f"the body is not valid JSON: {exc}") from None


def dicom_json(payload: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(payload, status=status, content_type="application/dicom+json", **kwargs)


@routes.post("/workitems")
@requires("worklist")
async def create_workitem(request: web.Request) -> web.Response:
    fields = await read_json(request)
    dataset = worklist_entry(fields)
    store = request.app[ARCHIVE].workitems
    org = principal(request).storing_organization
    item = await in_thread(request, lambda: store.create(dataset, org, unique_study=True))
    return web.json_response(item.worklist_view().to_json_dict())


@routes.get("/workitems")
@requires("worklist")
async def list_workitems(request: web.Request) -> web.Response:
    patient_id = request.query.get("patientID", request.query.get("PatientID", ""))
    keys = {"PatientID": patient_id} if patient_id else {}
    store = request.app[ARCHIVE].workitems
    orgs = principal(request).organizations
    items = await in_thread(request, lambda: [w.worklist_view().to_json_dict() for w in store.find(keys, orgs)])
    return web.json_response(items)


@routes.delete("/workitems/{study_uid}")
@requires("worklist")
async def delete_workitem(request: web.Request) -> web.Response:
    store = request.app[ARCHIVE].workitems
    orgs = principal(request).organizations
    await in_thread(request, store.delete_by_study, request.match_info["study_uid"], orgs)
    return web.Response(status=204)
