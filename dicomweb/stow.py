"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with a
``multipart/related; type="application/dicom"`` body.

The body is read as a stream: each part goes chunk by chunk into an archive temp file,
so memory stays flat however large the request (the multipart framing is parsed here,
with large reads and ``bytes.find``, rather than line by line). Each part is prepared
(parsed, checked, its content synced: ``Archive.prepare_temp``) while the rest of the body
arrives; only when the whole body has arrived (closing boundary seen) are the prepared
parts stored (``Archive.store_prepared``, the second half of the one ingest path). A
truncated or malformed body is refused with 400 and nothing of it is stored.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage import (
    Archive, ArchiveError, InvalidInstance, NotDicom, PreparedInstance, Source, StorageFailure,
    StudyMismatch, UnsupportedSOPClass,
)
from storage.uids import is_valid_uid

from .auth import principal, requires
from .keys import EXECUTOR, SETTINGS
from .rs_common import (
    archive_of, dicom_json_response, instance_url, parse_media_type, path_uid, run_blocking, study_url,
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
    who = principal(request)
    source = Source("http", who.subject, request.remote or "", who.storing_organization)
    parts = await _receive_parts(request, _Preparations(request, archive, source, expected_study))
    outcomes = await _store_all(request, archive, parts)
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


# Reading the body: the chunks the server has read from the socket, boundaries found
# with bytes.find, each part's bytes (views of those chunks) gathered up to FLUSH_BYTES
# and written to its temp file in one executor call (a typical instance: new temp,
# write, close in a single call).
FLUSH_BYTES = 4 << 20
MAX_PART_HEADERS = 16 << 10
# Parts of one request prepared at once (each in the thread pool) while the body
# arrives: their content syncs overlap instead of queueing. Preparing may hold an
# instance in memory while parsing it: parts are prepared together only while their
# sizes add up to STORE_BYTES_TOGETHER (a larger part goes alone); the body waits meanwhile.
STORE_CONCURRENCY = 4
STORE_BYTES_TOGETHER = 64 << 20


class _StoreBudget:
    """At most ``slots`` stores at once, and together at most ``nbytes`` (one always may)."""

    def __init__(self, slots: int, nbytes: int) -> None:
        self.slots, self.nbytes = slots, nbytes
        self.busy, self.used = 0, 0
        self.changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.busy == 0 or (self.busy < self.slots and self.used + size <= self.nbytes))
            self.busy += 1
            self.used += size

    async def release(self, size: int) -> None:
        async with self.changed:
            self.busy -= 1
            self.used -= size
            self.changed.notify_all()


class _Body:
    """The request body as the chunks the server hands over, read without joining them:
    ``data[pos:]`` is what has arrived and is not yet consumed. A part's content is passed
    on as views of these (immutable) chunks, so its bytes are not copied on the way to the
    temp file; only the small structures between parts are ever joined across chunks."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.content = request.content
        self.limit = limit
        self.received = 0
        self.data = b""
        self.pos = 0
        self.eof = False

    async def next_chunk(self) -> bytes:
        """The next chunk of the body, counted against the limit (b"" at its end).
        (``readchunk`` hands over what the server read as it is; ``readany`` joins all
        that is buffered, a copy.)"""
        while True:
            chunk, end_of_http_chunk = await self.content.readchunk()
            if chunk:
                break
            if not end_of_http_chunk:
                self.eof = True
                return b""
        self.received += len(chunk)
        if self.received > self.limit:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.limit, actual_size=self.received,
                text=f"the request exceeds [http] max_request_mb = {self.limit >> 20}; nothing was stored",
            )
        return chunk

    async def fill(self) -> None:
        """Read more: what is left (a short rest) joined with the next chunk; at the end
        of the body set ``eof``."""
        chunk = await self.next_chunk()
        if chunk:
            self.data = self.data[self.pos:] + chunk if self.pos < len(self.data) else chunk
            self.pos = 0


class _PartSink:
    """One part's bytes on their way to its archive temp file (None: read and dropped)."""

    def __init__(self, request: web.Request, archive: Archive, keep: bool) -> None:
        self.request = request
        self.archive = archive
        self.keep = keep
        self.pending: list[bytes | memoryview] = []
        self.size = 0
        self.total = 0
        self.fh = None
        self.temp: Path | None = None

    async def write(self, data: bytes | memoryview) -> None:
        if not self.keep or not data:
            return
        self.pending.append(data)
        self.size += len(data)
        self.total += len(data)
        if self.size >= FLUSH_BYTES:
            await run_blocking(self.request, self._flush, False)

    async def close(self) -> Path | None:
        if self.keep:
            await run_blocking(self.request, self._flush, True)
        return self.temp

    def _flush(self, last: bool) -> None:
        if self.fh is None:
            self.fh, self.temp = self.archive.new_temp()
        data, self.pending, self.size = self.pending, [], 0
        try:
            self.fh.writelines(data)
        finally:
            if last:
                self.fh.close()

    def abandon(self) -> None:
        """Close the temp file (runs in the executor; the temp is discarded by the caller)."""
        if self.fh is not None:
            self.fh.close()


class _Preparations:
    """The body's parts being prepared (``Archive.prepare_temp``: parsed, checked, their
    content synced) while the rest of the body arrives; nothing is stored yet."""

    def __init__(self, request: web.Request, archive: Archive, source: Source, expected_study: str | None) -> None:
        self.request = request
        self.archive = archive
        self.source = source
        self.expected_study = expected_study
        self.budget = _StoreBudget(STORE_CONCURRENCY, STORE_BYTES_TOGETHER)
        self.parts: list[asyncio.Future[PreparedInstance | PartOutcome]] = []

    async def add(self, temp: Path, size: int) -> None:
        """Start preparing the next part (once the budget allows: the body waits)."""
        await self.budget.acquire(size)
        self.parts.append(asyncio.ensure_future(self._prepare(temp, size, len(self.parts) + 1)))

    async def _prepare(self, temp: Path, size: int, position: int) -> PreparedInstance | PartOutcome:
        job = asyncio.ensure_future(run_blocking(self.request, _prepare_one, self.archive, temp, position,
                                                 self.source, self.expected_study))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(self._discard_prepared)  # the pool finishes it: its temp file goes then
            raise
        finally:
            await self.budget.release(size)

    def _discard_prepared(self, job: asyncio.Future) -> None:
        if not job.cancelled() and job.exception() is None and isinstance(job.result(), PreparedInstance):
            self.request.app[EXECUTOR].submit(self.archive.discard_temp, job.result().temp)

    def refuse(self, reason: str) -> None:
        """The next part will not be stored: ``reason``."""
        log.warning("STOW part %d from %s refused (0x0110): %s", len(self.parts) + 1, self.source, reason)
        refused = asyncio.get_running_loop().create_future()
        refused.set_result(PartOutcome("", "", failure_reason=0x0110, message=reason))
        self.parts.append(refused)

    async def results(self) -> list[PreparedInstance | PartOutcome]:
        return list(await asyncio.gather(*self.parts))

    async def abandon(self) -> None:
        """Wait for the parts in preparation, then discard every prepared temp file."""
        done = await asyncio.gather(*self.parts, return_exceptions=True)
        prepared = [part.temp for part in done if isinstance(part, PreparedInstance)]
        await run_blocking(self.request, _discard_all, self.archive, prepared)


async def _receive_parts(request: web.Request, preparing: _Preparations) -> list[PreparedInstance | PartOutcome]:
    """Write every application/dicom part to its own temp file and prepare it; the
    parts in body order. On any error every temp file goes and nothing is stored."""
    archive = preparing.archive
    limit = request.app[SETTINGS].http.max_request_mb * 1024 * 1024
    boundary = parse_media_type(request.headers.get("Content-Type")).params["boundary"].encode("latin-1")
    sink: _PartSink | None = None
    try:
        body = _Body(request, limit)
        await _skip_preamble(body, b"--" + boundary)
        delimiter = b"\r\n--" + boundary
        while True:
            if not await _after_delimiter(body):
                break  # the closing delimiter: the whole body is here
            part_type = await _part_headers(body)
            if part_type.startswith("multipart/"):
                raise web.HTTPBadRequest(text="nested multipart bodies are not accepted; send one part per instance")
            keep = part_type == DICOM
            sink = _PartSink(request, archive, keep)
            await _copy_until(body, delimiter, sink)
            temp = await sink.close()
            if temp is not None:
                await preparing.add(temp, sink.total)  # (until it returns, the temp is still the sink's)
            else:
                preparing.refuse(f"a part of type {part_type!r}: only application/dicom parts are stored")
            sink = None
        if not preparing.parts:
            raise web.HTTPBadRequest(text="the multipart body holds no part; send one application/dicom part per instance")
        return await preparing.results()
    except BaseException as exc:
        if sink is not None:
            await run_blocking(request, sink.abandon)
            if sink.temp is not None:
                await run_blocking(request, archive.discard_temp, sink.temp)
        await preparing.abandon()
        if isinstance(exc, (ValueError, AssertionError, ConnectionError, HttpProcessingError)):
            log.warning("STOW from %s abandoned, nothing stored: %s", request.remote, exc or type(exc).__name__)
            raise web.HTTPBadRequest(
                text=f"the multipart body is truncated or malformed ({exc or type(exc).__name__}); "
                "nothing was stored, send it again"
            ) from exc
        raise


async def _skip_preamble(body: _Body, first: bytes) -> None:
    """Drop everything up to and including the first delimiter (RFC 2046 5.1.1: at the
    very start, or at the start of a line)."""
    while True:
        data, pos = body.data, body.pos
        if data.startswith(first, pos):
            body.pos = pos + len(first)
            return
        at = data.find(b"\r\n" + first, pos)
        if at >= 0:
            body.pos = at + 2 + len(first)
            return
        if body.eof:
            raise ValueError("no boundary delimiter in the body")
        body.pos = max(pos, len(data) - len(first) - 2)  # keep what could start a delimiter
        await body.fill()


async def _after_delimiter(body: _Body) -> bool:
    """After a delimiter: False for the closing one (``--``), True when a part follows
    (its line end consumed, transport padding allowed before it)."""
    while True:
        data, pos = body.data, body.pos
        if data.startswith(b"--", pos):
            return False
        line_end = data.find(b"\r\n", pos, pos + 1026)
        if line_end >= 0:
            if data[pos:line_end].strip(b" \t"):
                raise ValueError("unexpected bytes after a boundary delimiter")
            body.pos = line_end + 2
            return True
        if len(data) - pos > 1024:
            raise ValueError("unexpected bytes after a boundary delimiter")
        if body.eof:
            raise ValueError("the body ends without its closing boundary")
        await body.fill()


async def _part_headers(body: _Body) -> str:
    """Read a part's header block; the media type of its Content-Type (default DICOM)."""
    while True:
        data, pos = body.data, body.pos
        if data.startswith(b"\r\n", pos):
            block = b""
            body.pos = pos + 2
            break
        end = data.find(b"\r\n\r\n", pos, pos + MAX_PART_HEADERS + 4)
        if end >= 0:
            block = data[pos:end]
            body.pos = end + 4
            break
        if len(data) - pos > MAX_PART_HEADERS:
            raise ValueError(f"part headers longer than {MAX_PART_HEADERS} bytes")
        if body.eof:
            raise ValueError("the body ends inside part headers")
        await body.fill()
    part_type = DICOM
    for line in block.split(b"\r\n") if block else ():
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"malformed part header {line[:80]!r}")
        if name.strip().lower() == b"content-type":
            part_type = value.decode("latin-1").split(";")[0].strip().lower() or DICOM
    return part_type


async def _copy_until(body: _Body, delimiter: bytes, sink: _PartSink) -> None:
    """Copy a part's content to ``sink`` up to ``delimiter`` (CRLF--boundary), which is
    consumed. The content goes on as views of the body's chunks; only what could be the
    start of a delimiter at a chunk's end (shorter than the delimiter) is held back,
    then looked at together with the start of the next chunk."""
    keep = len(delimiter) - 1
    while True:
        data, pos = body.data, body.pos
        at = data.find(delimiter, pos)
        if at >= 0:
            await sink.write(memoryview(data)[pos:at])
            body.pos = at + len(delimiter)
            return
        cut = max(pos, len(data) - keep)
        if cut > pos:
            await sink.write(memoryview(data)[pos:cut])
        body.pos = cut
        chunk = await body.next_chunk()
        if not chunk:
            raise ValueError("the body ends inside a part, without its closing boundary")
        tail = data[cut:]
        if tail:  # a delimiter may begin in the held-back rest and end in the new chunk
            at = (tail + chunk[:keep]).find(delimiter)
            if at >= 0:
                await sink.write(tail[:at])
                body.data, body.pos = chunk, at + len(delimiter) - len(tail)
                return
            if len(chunk) < keep:  # too short to decide: look again with the two joined
                body.data, body.pos = tail + chunk, 0
                continue
            await sink.write(tail)
        body.data, body.pos = chunk, 0


def _discard_all(archive: Archive, temps: list[Path]) -> None:
    for temp in temps:
        archive.discard_temp(temp)


async def _store_all(request: web.Request, archive: Archive,
                     parts: list[PreparedInstance | PartOutcome]) -> list[PartOutcome]:
    """Store the prepared parts together (``Archive.store_prepared_in_order``: the same
    SOP Instance UID twice in a body, the later part wins). Once handed over, the parts
    are the archive's: a client that goes away meanwhile does not undo them."""
    prepared = [part for part in parts if isinstance(part, PreparedInstance)]
    results = iter(await run_blocking(request, archive.store_prepared_in_order, prepared))
    outcomes = []
    for position, part in enumerate(parts):
        if isinstance(part, PreparedInstance):
            result = next(results)
            part = (
                _refused(result, (part.sop_class_uid, part.sop_instance_uid), position + 1, part.source)
                if isinstance(result, ArchiveError) else
                PartOutcome(result.sop_class_uid, result.sop_instance_uid, result.study_uid, result.series_uid))
        outcomes.append(part)
    return outcomes


def _prepare_one(archive: Archive, temp: Path, position: int, source: Source,
                 expected_study: str | None) -> PreparedInstance | PartOutcome:
    """Prepare one part; when it is refused, its temp file goes (read first for the
    UIDs that the failure report names)."""
    try:
        return archive.prepare_temp(temp, source, expected_study)
    except ArchiveError as exc:
        refused = _refused(exc, _peek_uids(temp), position, source)
        archive.discard_temp(temp)
        return refused
    except BaseException:
        archive.discard_temp(temp)
        raise


def _refused(exc: ArchiveError, uids: tuple[str, str], position: int, source: Source) -> PartOutcome:
    sop_class, sop_uid = uids
    reason = next((code for cls, code in FAILURE_REASON if isinstance(exc, cls)), 0xA900)
    if reason == 0xA900 and not (sop_class or sop_uid):
        reason = 0x0110  # nothing identifies it as a DICOM instance: not DICOM
    log.warning("STOW part %d from %s refused (0x%04X): %s", position, source, reason, exc.message)
    return PartOutcome(sop_class, sop_uid, failure_reason=reason, message=exc.message)


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
