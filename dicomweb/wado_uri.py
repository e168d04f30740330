"""WADO-URI (PS3.18 9): ``GET /dicomweb/wado?requestType=WADO&studyUID=&seriesUID=
&objectUID=&contentType=`` for ``application/dicom`` and rendered images (with ``rows``,
``columns``, ``windowCenter``, ``windowWidth``, ``frameNumber``, ``imageQuality``)."""
from __future__ import annotations

from aiohttp import web
from multidict import MultiMapping

from storage import Archive, StoredInstance
from storage.uids import is_valid_uid

from .auth import requires
from .rendered import http_error
from .rendering import RENDERED_TYPES, NoImage, RenderError, RenderOptions, Window, parse_quality, render
from .rs_common import archive_of, not_modified, organizations, run_blocking, send_file, validators
from .transfer import output_syntax, transcode
from .wado import check_plan_transcodable

routes = web.RouteTableDef()

DICOM = "application/dicom"
KNOWN = frozenset({
    "requestType", "studyUID", "seriesUID", "objectUID", "contentType", "charset", "annotation",
    "rows", "columns", "windowCenter", "windowWidth", "frameNumber", "imageQuality", "transferSyntax",
})
# Parameters of PS3.18 Table 9.4-1 this node does not implement: refused rather than
# ignored, so that nobody receives identified data believing it was de-identified.
UNSUPPORTED = frozenset({"anonymize", "region", "presentationUID", "presentationSeriesUID"})


@routes.get("/dicomweb/wado")
@requires("dicomweb.read")
async def wado_uri(request: web.Request) -> web.StreamResponse:
    query = request.query
    unsupported = sorted(set(query) & UNSUPPORTED)
    if unsupported:
        raise web.HTTPBadRequest(text=f"WADO-URI parameter(s) {', '.join(unsupported)} are not supported by this node")
    unknown = sorted(set(query) - KNOWN - UNSUPPORTED)
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown WADO-URI parameter(s) {', '.join(unknown)}; see PS3.18 Table 9.4-1")
    if query.get("requestType") != "WADO":
        raise web.HTTPBadRequest(text="requestType=WADO is required")
    study, series, sop = (_uid(query, name) for name in ("studyUID", "seriesUID", "objectUID"))
    archive = archive_of(request)
    item = await run_blocking(request, archive.instance, study, series, sop, organizations(request))
    content_type = _content_type(query)
    headers = await run_blocking(request, validators, archive, [item], request.query_string)
    if not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    if content_type == DICOM:
        return await _dicom_response(request, archive, item, headers)
    options = _render_options(query, content_type)
    try:
        image = await run_blocking(request, _render, archive, item, options)
    except NoImage as exc:
        if "contentType" in query:
            raise http_error(exc) from exc
        # PS3.18 9.4.2: without contentType a non-image object goes out as application/dicom
        return await _dicom_response(request, archive, item, headers)
    except RenderError as exc:
        raise http_error(exc) from exc
    return web.Response(body=image, headers={**headers, "Content-Type": content_type})


async def _dicom_response(request: web.Request, archive: Archive, item: StoredInstance,
                          headers: dict[str, str]) -> web.StreamResponse:
    asked = request.query.get("transferSyntax") or None
    syntax = output_syntax(item.transfer_syntax_uid, asked)
    if syntax is None:
        raise web.HTTPNotAcceptable(text=(
            f"instance {item.sop_instance_uid} is stored as {item.transfer_syntax_uid} and cannot be sent as "
            f"{asked}; ask for transferSyntax=* or 1.2.840.10008.1.2.1"
        ))
    headers = {**headers, "Content-Type": DICOM,
               "Content-Disposition": f'attachment; filename="{item.sop_instance_uid}.dcm"'}
    if syntax == item.transfer_syntax_uid:
        return await send_file(request, archive, item, headers)
    await run_blocking(request, check_plan_transcodable, archive, [(item, syntax)])
    return web.Response(body=await run_blocking(request, _transcoded, archive, item, syntax), headers=headers)


def _uid(query: MultiMapping[str], name: str) -> str:
    value = query.get(name, "")
    if not is_valid_uid(value):
        raise web.HTTPBadRequest(text=f"{name}={value!r}: a DICOM UID (digits and dots) is required")
    return value


def _content_type(query: MultiMapping[str]) -> str:
    """The first supported entry of ``contentType`` (default image/jpeg, PS3.18 9.4.2)."""
    asked = [t.split(";")[0].strip().lower() for t in query.get("contentType", "image/jpeg").split(",")]
    for media_type in asked:
        if media_type in (DICOM, *RENDERED_TYPES):
            return media_type
        if media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise web.HTTPNotAcceptable(text=f"contentType {query.get('contentType')!r}: use application/dicom, "
                                     + ", ".join(RENDERED_TYPES))


def _render_options(query: MultiMapping[str], media_type: str) -> RenderOptions:
    try:
        window = None
        if "windowCenter" in query or "windowWidth" in query:
            if not ("windowCenter" in query and "windowWidth" in query):
                raise RenderError("windowCenter and windowWidth go together; give both or neither")
            try:
                window = Window(float(query["windowCenter"]), float(query["windowWidth"]))
            except ValueError:
                raise RenderError("windowCenter and windowWidth must be numbers") from None
            if window.width < 1:
                raise RenderError("windowWidth must be at least 1")
        rows = _positive(query, "rows")
        columns = _positive(query, "columns")
        viewport = None
        if rows or columns:
            viewport = (columns or 8192, rows or 8192)
        frame = _positive(query, "frameNumber")
        quality = parse_quality(query["imageQuality"]) if "imageQuality" in query else 90
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    return RenderOptions(media_type, window, viewport, quality, frame - 1 if frame else 0)


def _positive(query: MultiMapping[str], name: str) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        raise RenderError(f"{name}={query[name]!r}: use a positive whole number") from None
    if not 0 < value <= 8192:
        raise RenderError(f"{name}={value}: use a number from 1 to 8192")
    return value


def _transcoded(archive: Archive, item: StoredInstance, syntax: str) -> bytes:
    with archive.open_instance(item) as fh:
        return transcode(fh, syntax)


def _render(archive: Archive, item: StoredInstance, options: RenderOptions) -> bytes:
    with archive.open_instance(item) as fh:
        return render(fh, options)
