"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with a
``multipart/related; type="application/dicom"`` body.

The body is read as a stream: each part goes chunk by chunk into an archive temp file,
so memory stays flat however large the request. Only when the whole body has arrived
(closing boundary seen) are the parts handed to the one ingest path; a truncated or
malformed body is refused with 400 and nothing of it is stored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage import (
    Archive, ArchiveError, InvalidInstance, NotDicom, Source, StorageFailure, StudyMismatch,
    UnsupportedSOPClass,
)
from storage.uids import is_valid_uid

from .auth import principal, requires
from .keys import SETTINGS
from .rs_common import (
    CHUNK, archive_of, dicom_json_response, instance_url, parse_media_type, path_uid, run_blocking, study_url,
)

log = logging.getLogger("dicomnode.stow")
routes = web.RouteTableDef()

DICOM = "application/dicom"

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 failure reasons, most specific first.
FAILURE_REASON: tuple[tuple[type, int], ...] = (
    (StudyMismatch, 0xC122),
    (NotDicom, 0x0110),
    (UnsupportedSOPClass, 0x0122),
    (InvalidInstance, 0xA900),
    (StorageFailure, 0xA700),
)


@dataclass(frozen=True)
class ReceivedPart:
    """One part of the body: its temp file, or why it was not kept."""

    temp: Path | None
    refusal: str = ""


@dataclass
class PartOutcome:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str = ""
    series_uid: str = ""
    failure_reason: int | None = None
    message: str = ""


@routes.post("/dicomweb/studies")
@requires("dicomweb.write")
async def store_instances(request: web.Request) -> web.Response:
    return await _store(request, expected_study=None)


@routes.post("/dicomweb/studies/{study}")
@requires("dicomweb.write")
async def store_instances_in_study(request: web.Request) -> web.Response:
    return await _store(request, expected_study=path_uid(request, "study"))


async def _store(request: web.Request, expected_study: str | None) -> web.Response:
    _check_content_type(request)
    archive = archive_of(request)
    parts = await _receive_parts(request, archive)
    who = principal(request)
    source = Source("http", who.subject, request.remote or "", who.storing_organization)
    outcomes = await run_blocking(request, _ingest_all, archive, parts, source, expected_study)
    return _response(request, outcomes)


def _check_content_type(request: web.Request) -> None:
    content_type = parse_media_type(request.headers.get("Content-Type"))
    if content_type is None or content_type.media_type != "multipart/related":
        raise web.HTTPUnsupportedMediaType(
            text='STOW-RS takes Content-Type: multipart/related; type="application/dicom"; boundary=...'
        )
    part_type = content_type.params.get("type", DICOM).lower()
    if part_type != DICOM:
        raise web.HTTPUnsupportedMediaType(
            text=f'this node stores type="application/dicom" parts only, not {part_type!r}'
        )
    if not content_type.params.get("boundary"):
        raise web.HTTPBadRequest(text="the multipart/related Content-Type has no boundary parameter")


async def _receive_parts(request: web.Request, archive: Archive) -> list[ReceivedPart]:
    """Write every application/dicom part to its own temp file; on any error discard them all."""
    limit = request.app[SETTINGS].http.max_request_mb * 1024 * 1024
    received = 0
    parts: list[ReceivedPart] = []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not hasattr(part, "read_chunk"):
                raise web.HTTPBadRequest(text="nested multipart bodies are not accepted; send one part per instance")
            part_type = part.headers.get("Content-Type", DICOM).split(";")[0].strip().lower()
            fh, temp = None, None
            if part_type == DICOM:
                fh, temp = await run_blocking(request, archive.new_temp)
                parts.append(ReceivedPart(temp))
            else:
                parts.append(ReceivedPart(None, f"a part of type {part_type!r}: only application/dicom parts are stored"))
            try:
                while True:
                    chunk = await part.read_chunk(CHUNK)
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > limit:
                        raise web.HTTPRequestEntityTooLarge(
                            max_size=limit, actual_size=received,
                            text=f"the request exceeds [http] max_request_mb = {limit >> 20}; nothing was stored",
                        )
                    if fh is not None:
                        await run_blocking(request, fh.write, chunk)
            finally:
                if fh is not None:
                    await run_blocking(request, fh.close)
        if not parts:
            raise web.HTTPBadRequest(text="the multipart body holds no part; send one application/dicom part per instance")
        return parts
    except BaseException as exc:
        await run_blocking(request, _discard_all, archive, parts)
        if isinstance(exc, (ValueError, AssertionError, ConnectionError, HttpProcessingError)):
            log.warning("STOW from %s abandoned, nothing stored: %s", request.remote, exc or type(exc).__name__)
            raise web.HTTPBadRequest(
                text=f"the multipart body is truncated or malformed ({exc or type(exc).__name__}); "
                "nothing was stored, send it again"
            ) from exc
        raise


def _discard_all(archive: Archive, parts: list[ReceivedPart]) -> None:
    for part in parts:
        if part.temp is not None:
            archive.discard_temp(part.temp)


def _ingest_all(archive: Archive, parts: list[ReceivedPart], source: Source,
                expected_study: str | None) -> list[PartOutcome]:
    """Store each received part through the one ingest path (runs in the executor)."""
    outcomes = []
    for position, part in enumerate(parts, start=1):
        if part.temp is None:
            log.warning("STOW part %d from %s refused (0x0110): %s", position, source, part.refusal)
            outcomes.append(PartOutcome("", "", failure_reason=0x0110, message=part.refusal))
            continue
        outcomes.append(_ingest_one(archive, part.temp, position, source, expected_study))
    return outcomes


def _ingest_one(archive: Archive, temp: Path, position: int, source: Source, expected_study: str | None) -> PartOutcome:
    sop_class, sop_uid = _peek_uids(temp)
    try:
        result = archive.store_temp(temp, source, expected_study)
    except ArchiveError as exc:
        reason = next((code for cls, code in FAILURE_REASON if isinstance(exc, cls)), 0xA900)
        if reason == 0xA900 and not (sop_class or sop_uid):
            reason = 0x0110  # nothing identifies it as a DICOM instance: not DICOM
        log.warning("STOW part %d from %s refused (0x%04X): %s", position, source, reason, exc.message)
        return PartOutcome(sop_class, sop_uid, failure_reason=reason, message=exc.message)
    finally:
        archive.discard_temp(temp)
    return PartOutcome(result.sop_class_uid, result.sop_instance_uid, result.study_uid, result.series_uid)


def _peek_uids(temp: Path) -> tuple[str, str]:
    """SOP class and instance UIDs of a part, if it has them (for the failure report)."""
    try:
        ds = pydicom.dcmread(temp, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        found = (str(ds.get("SOPClassUID", "")).rstrip("\x00 "), str(ds.get("SOPInstanceUID", "")).rstrip("\x00 "))
    except Exception:
        return "", ""
    return tuple(uid if is_valid_uid(uid) else "" for uid in found)  # type: ignore[return-value]


def _response(request: web.Request, outcomes: list[PartOutcome]) -> web.Response:
    stored = [o for o in outcomes if o.failure_reason is None]
    failed = [o for o in outcomes if o.failure_reason is not None]
    body: dict[str, dict] = {}
    studies = {o.study_uid for o in stored}
    if len(studies) == 1:  # the study's RetrieveURL, when everything stored went to one study
        body["00081190"] = {"vr": "UR", "Value": [study_url(request, studies.pop())]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_failed_item(o) for o in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_referenced_item(request, o) for o in stored]}
    status = 200 if not failed else 202 if stored else 409
    response = dicom_json_response(body, status)
    # The response data set has no slot for the reason text; say it in Warning headers.
    for outcome in failed[:10]:
        text = outcome.message.replace('"', "'").replace("\r", " ").replace("\n", " ")
        text = text.encode("ascii", "replace").decode("ascii")[:300]
        response.headers.add("Warning", f'299 dicomnode "{outcome.sop_instance_uid or "part"}: {text}"')
    return response


def _referenced_item(request: web.Request, outcome: PartOutcome) -> dict:
    return {
        "00081150": {"vr": "UI", "Value": [outcome.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [outcome.sop_instance_uid]},
        "00081190": {"vr": "UR", "Value": [
            instance_url(request, outcome.study_uid, outcome.series_uid, outcome.sop_instance_uid)]},
    }


def _failed_item(outcome: PartOutcome) -> dict:
    item: dict[str, dict] = {}
    item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]} if outcome.sop_class_uid else {"vr": "UI"}
    item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]} if outcome.sop_instance_uid else {"vr": "UI"}
    item["00081197"] = {"vr": "US", "Value": [outcome.failure_reason]}
    return item
