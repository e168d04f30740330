"""WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related`` of
``application/dicom`` streamed from disk, their metadata as DICOM JSON, frames, bulk
data; and DELETE of a study, series or instance (admin only)."""
from __future__ import annotations

import json

import orjson
import pydicom
from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, NotFound, StoredInstance
from storage.metadata_cache import MetadataPrefill

from .auth import requires
from .dicom_json import dataset_json, find_element
from .rs_common import (
    FilePart, MediaRange, MultipartStream, archive_of, base_url, dicom_json_response, instance_url,
    not_acceptable, not_modified, organizations, parse_accept, path_uid, resource_url, run_blocking,
    send_file, send_multipart_files, validators, validators_and_sizes,
)
from .transfer import (
    ANY, FRAME_MEDIA_TYPE, OCTET_STREAM, TooLargeToTranscode, can_decode, check_transcodable, output_syntax,
    pixel_data_value, read_frames, transcode,
)

routes = web.RouteTableDef()

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
INSTANCE = "/dicomweb/studies/{study}/series/{series}/instances/{instance}"
PIXEL_DATA = "7FE00010"


# --------------------------------------------------------------------------- addressing


def addressed(request: web.Request) -> tuple[str, str | None, str | None]:
    """(study, series, instance) UIDs of the URL, each checked to be a plain UID."""
    study = path_uid(request, "study")
    series = path_uid(request, "series") if "series" in request.match_info else None
    instance = path_uid(request, "instance") if "instance" in request.match_info else None
    return study, series, instance


async def stored_instances(request: web.Request) -> list[StoredInstance]:
    """The caller's stored instances under the URL; 404 if none (or another organization's)."""
    study, series, instance = addressed(request)
    found = await run_blocking(
        request, archive_of(request).instances, study, series, (instance,) if instance else None,
        organizations(request),
    )
    if not found:
        what = f"instance {instance}" if instance else f"series {series}" if series else f"study {study}"
        raise NotFound(f"{what} not found")
    return found


# --------------------------------------------------------------------------- instances


@routes.get("/dicomweb/studies/{study}")
@routes.get("/dicomweb/studies/{study}/series/{series}")
@routes.get(INSTANCE)
@requires("dicomweb.read")
async def retrieve(request: web.Request) -> web.StreamResponse:
    stored = await stored_instances(request)
    ranges = parse_accept(request.headers.get("Accept"))
    plan, single = _plan_dicom(ranges, stored, is_instance="instance" in request.match_info)
    archive = archive_of(request)
    await run_blocking(request, check_plan_transcodable, archive, plan)
    headers, sizes = await run_blocking(request, validators_and_sizes, archive, stored,
                                        request.headers.get("Accept", ""))
    if not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    if single:
        [(item, syntax)] = plan
        headers["Content-Type"] = f"{DICOM}; transfer-syntax={syntax}"
        if syntax == item.transfer_syntax_uid:
            return await send_file(request, archive, item, headers)
        return web.Response(body=await run_blocking(request, _transcoded, archive, item, syntax), headers=headers)
    if sizes is not None and all(syntax == item.transfer_syntax_uid for item, syntax in plan):
        # every file goes out as stored: a Content-Length, and the bodies by sendfile
        base = base_url(request)
        return await send_multipart_files(request, archive, DICOM, headers, [
            FilePart(f"{DICOM}; transfer-syntax={syntax}", item, size,
                     resource_url(base, item.study_uid, item.series_uid, item.sop_instance_uid))
            for (item, syntax), size in zip(plan, sizes)
        ])
    stream = MultipartStream(request, DICOM, headers)
    for item, syntax in plan:
        part_type = f"{DICOM}; transfer-syntax={syntax}"
        location = instance_url(request, item.study_uid, item.series_uid, item.sop_instance_uid)
        if syntax == item.transfer_syntax_uid:
            await stream.write_file_part(part_type, archive, item, location)
        else:
            await stream.write_part(part_type, await run_blocking(request, _transcoded, archive, item, syntax), location)
    return await stream.finish()


def _plan_dicom(ranges: list[MediaRange], stored: list[StoredInstance],
                is_instance: bool) -> tuple[list[tuple[StoredInstance, str]], bool]:
    """The syntax each instance goes out in, and whether the answer is a single
    ``application/dicom`` body (only for an instance, when that is what was asked)."""
    dicom_ranges = []
    for media in ranges:
        single = media.media_type == DICOM
        if single and not is_instance:
            continue
        if not (single or media.media_type in ("*/*", "multipart/*")
                or (media.is_multipart and media.part_type in ("", DICOM, "application/*", "*/*"))):
            continue
        dicom_ranges.append(media)
        plan = [(item, output_syntax(item.transfer_syntax_uid, media.transfer_syntax)) for item in stored]
        if all(syntax is not None for _, syntax in plan):
            return plan, single  # type: ignore[return-value]
    if not dicom_ranges:
        raise not_acceptable("DICOM instances", ['multipart/related; type="application/dicom"']
                             + (["application/dicom"] if is_instance else []))
    asked = ", ".join(r.transfer_syntax or ExplicitVRLittleEndian for r in dicom_ranges)
    raise web.HTTPNotAcceptable(text=(
        f"cannot send these instances in the transfer syntax asked for ({asked}): they are stored as "
        + ", ".join(sorted({s.transfer_syntax_uid for s in stored}))
        + '; ask for transfer-syntax=* (as stored) or 1.2.840.10008.1.2.1 (decoded), e.g. '
        'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
    ))


def check_plan_transcodable(archive: Archive, plan: list[tuple[StoredInstance, str]]) -> None:
    """406 before streaming starts if an instance to transcode is too large for memory."""
    for item, syntax in plan:
        if syntax != item.transfer_syntax_uid:
            with archive.open_instance(item) as fh:
                try:
                    check_transcodable(fh, item.sop_instance_uid)
                except TooLargeToTranscode as exc:
                    raise web.HTTPNotAcceptable(text=str(exc)) from exc


def _transcoded(archive: Archive, item: StoredInstance, syntax: str) -> bytes:
    with archive.open_instance(item) as fh:
        return transcode(fh, syntax)


# --------------------------------------------------------------------------- metadata


@routes.get("/dicomweb/studies/{study}/metadata")
@routes.get("/dicomweb/studies/{study}/series/{series}/metadata")
@routes.get(INSTANCE + "/metadata")
@requires("dicomweb.read")
async def metadata(request: web.Request) -> web.Response:
    if not any(r.matches(DICOM_JSON) or r.media_type == "application/json" for r in
               parse_accept(request.headers.get("Accept"))):
        raise not_acceptable("metadata", (DICOM_JSON,))
    stored = await stored_instances(request)
    archive = archive_of(request)
    headers = await run_blocking(request, validators, archive, stored, "metadata")
    if not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    body = await run_blocking(request, _metadata, archive, stored, base_url(request))
    return dicom_json_response(body, headers=headers)


# The DICOM JSON of one instance is cached (storage keeps it per blob) with each
# BulkDataURI relative to the instance (``7FE00010``, ``00400275/0/00081032``): the
# absolute URL depends on how the client addressed us (Host, X-Forwarded-*), so it is
# filled in per request. Bump the version whenever _instance_json's output changes.
METADATA_CACHE_VERSION = "wado-metadata-1"
_BULK = b'"BulkDataURI":"'


def _metadata(archive: Archive, stored: list[StoredInstance], base: str) -> bytes:
    """The JSON array of the instances' metadata: cached fragments joined (bytes)."""
    parts = []
    with archive.metadata_cache.reading():  # the background prefill stands back meanwhile
        for item in stored:
            fragment = archive.instance_metadata(item, METADATA_CACHE_VERSION, _instance_json)
            if _BULK in fragment:
                url = resource_url(base, item.study_uid, item.series_uid, item.sop_instance_uid) + "/bulkdata/"
                fragment = fragment.replace(_BULK, _BULK + orjson.dumps(url)[1:-1])
            parts.append(fragment)
    return b"[" + b",".join(parts) + b"]"


def metadata_prefill(archive: Archive) -> MetadataPrefill:
    """The background worker that builds this module's metadata cache entries for newly
    stored instances (the composition root subscribes it to the archive's events)."""
    return MetadataPrefill(archive, METADATA_CACHE_VERSION, _instance_json)


def _instance_json(item: StoredInstance, ds: Dataset) -> bytes:
    """One instance's DICOM JSON object, BulkDataURIs relative to the instance. JSON
    without whitespace, so that ``"BulkDataURI":"`` finds exactly those values (inside a
    JSON string every quote is escaped: the pattern can only be a member name)."""
    body = dataset_json(ds, str)
    if "Rows" in ds and "Columns" in ds:
        packed = pydicom.uid.UID(item.transfer_syntax_uid).is_compressed or int(ds.get("BitsAllocated", 8)) <= 8
        body[PIXEL_DATA] = {"vr": "OB" if packed else "OW", "BulkDataURI": PIXEL_DATA}
    body = dict(sorted(body.items()))
    try:
        return orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError):  # integers beyond 64 bits
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- frames


@routes.get(INSTANCE + "/frames/{frames}")
@requires("dicomweb.read")
async def frames(request: web.Request) -> web.StreamResponse:
    numbers = parse_frame_list(request.match_info["frames"])
    [item] = await stored_instances(request)
    ranges = parse_accept(request.headers.get("Accept"))
    part_type, decode = _plan_frames(ranges, item.transfer_syntax_uid)
    archive = archive_of(request)
    try:
        _, data = await run_blocking(request, _read_frames, archive, item, numbers, decode)
    except LookupError as exc:  # no such frame, or no pixel data at all
        raise web.HTTPNotFound(text=str(exc)) from exc
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise web.HTTPNotAcceptable(text=(
            f"the frames cannot be decoded here ({exc}); ask for transfer-syntax=* to get them as stored"
        )) from exc
    stream = MultipartStream(request, part_type.split(";")[0])
    base = instance_url(request, item.study_uid, item.series_uid, item.sop_instance_uid)
    for number, frame in zip(numbers, data):
        await stream.write_part(part_type, frame, f"{base}/frames/{number}")
    return await stream.finish()


def parse_frame_list(text: str) -> list[int]:
    try:
        numbers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise web.HTTPBadRequest(text=f"frames {text!r}: use a comma-separated list of frame numbers from 1, e.g. frames/1,3")
    return numbers


def _plan_frames(ranges: list[MediaRange], stored_syntax: str) -> tuple[str, bool]:
    """(part Content-Type, decode?) for frames of an instance stored in ``stored_syntax``."""
    compressed_type = FRAME_MEDIA_TYPE.get(stored_syntax)
    native = f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"
    for media in ranges:
        if not (media.is_multipart or media.media_type in ("*/*", "multipart/*")):
            continue
        wanted = media.part_type or OCTET_STREAM
        syntax = media.transfer_syntax
        if wanted in (OCTET_STREAM, "*/*", "application/*"):
            if compressed_type is None and syntax in (None, ANY, ExplicitVRLittleEndian, stored_syntax):
                return native, False
            if compressed_type is not None and syntax == ANY:
                return f"{compressed_type}; transfer-syntax={stored_syntax}", False
            if compressed_type is not None and syntax in (None, ExplicitVRLittleEndian) and can_decode(stored_syntax):
                return native, True
        elif compressed_type is not None and media.matches(compressed_type) and syntax in (None, ANY, stored_syntax):
            return f"{compressed_type}; transfer-syntax={stored_syntax}", False
    offered = [native] if compressed_type is None else [f"{compressed_type}; transfer-syntax={stored_syntax}"] + (
        [native] if can_decode(stored_syntax) else [])
    raise not_acceptable("these frames", [f'multipart/related; type="{o.split(";")[0]}"' + o[o.index(";"):] for o in offered])


def _read_frames(archive: Archive, item: StoredInstance, numbers: list[int], decode: bool):
    with archive.open_instance(item) as fh:
        return read_frames(fh, numbers, decode)


# --------------------------------------------------------------------------- bulk data


@routes.get(INSTANCE + "/bulkdata/{path:[0-9A-Fa-f/]+}")
@requires("dicomweb.read")
async def bulkdata(request: web.Request) -> web.StreamResponse:
    if not any(r.media_type in ("*/*", "multipart/*", OCTET_STREAM) or (r.is_multipart and r.matches(OCTET_STREAM))
               for r in parse_accept(request.headers.get("Accept"))):
        raise not_acceptable("bulk data", (f'multipart/related; type="{OCTET_STREAM}"',))
    [item] = await stored_instances(request)
    archive = archive_of(request)
    path = request.match_info["path"].strip("/").upper()
    stream = MultipartStream(request, OCTET_STREAM)
    if path == PIXEL_DATA:
        where = await run_blocking(request, _native_pixel_data, archive, item)
        if where is not None:  # native pixel data: streamed straight from the file
            await stream.write_file_part(OCTET_STREAM, archive, item, str(request.url), *where)
            return await stream.finish()
    value = await run_blocking(request, _bulk_value, archive, item, path)
    await stream.write_part(OCTET_STREAM, value, str(request.url))
    return await stream.finish()


def _native_pixel_data(archive: Archive, item: StoredInstance) -> tuple[int, int] | None:
    """(offset, length) of native little endian pixel data in the file; None otherwise."""
    syntax = pydicom.uid.UID(item.transfer_syntax_uid)
    if syntax.is_compressed or not syntax.is_little_endian:
        return None
    with archive.open_instance(item) as fh:
        pydicom.dcmread(fh, stop_before_pixels=True)
        try:
            return pixel_data_value(fh, syntax)
        except LookupError:
            raise NotFound(f"instance {item.sop_instance_uid} has no pixel data") from None


def _bulk_value(archive: Archive, item: StoredInstance, path: str) -> bytes:
    with archive.open_instance(item) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=not path.startswith("7FE0"))
    element = find_element(ds, path)
    if element is None or not isinstance(element.value, (bytes, bytearray)):
        raise NotFound(f"instance {item.sop_instance_uid} has no bulk data at {path}")
    return bytes(element.value)


# --------------------------------------------------------------------------- delete


@routes.delete("/dicomweb/studies/{study}")
@routes.delete("/dicomweb/studies/{study}/series/{series}")
@routes.delete(INSTANCE)
@requires(admin=True)
async def delete(request: web.Request) -> web.Response:
    study, series, instance = addressed(request)
    await run_blocking(request, archive_of(request).delete, study, series, instance, organizations(request))
    return web.Response(status=204)
