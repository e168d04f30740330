"""WADO-RS rendered resources and thumbnails (PS3.18 10.4.1.1.3 / 10.4.1.1.4):
``/rendered`` and ``/thumbnail`` of studies, series, instances and frames as
image/jpeg, image/png or image/gif."""
from __future__ import annotations

from aiohttp import web
from multidict import MultiMapping

from storage import Archive, StoredInstance

from .auth import requires
from .rendering import (
    RENDERED_TYPES, THUMBNAIL_SIZE, NoImage, RenderError, RenderOptions, parse_quality, parse_viewport,
    parse_window, render,
)
from .rs_common import (
    MediaRange, MultipartStream, archive_of, not_acceptable, not_modified, parse_accept, run_blocking, validators,
)
from .wado import INSTANCE, parse_frame_list, stored_instances

routes = web.RouteTableDef()

THUMBNAIL_QUALITY = 75


@routes.get(INSTANCE + "/rendered")
@routes.get(INSTANCE + "/frames/{frames}/rendered")
@routes.get("/dicomweb/studies/{study}/rendered")
@routes.get("/dicomweb/studies/{study}/series/{series}/rendered")
@requires("dicomweb.read")
async def rendered(request: web.Request) -> web.StreamResponse:
    return await _render(request, thumbnail=False)


@routes.get(INSTANCE + "/thumbnail")
@routes.get(INSTANCE + "/frames/{frames}/thumbnail")
@routes.get("/dicomweb/studies/{study}/thumbnail")
@routes.get("/dicomweb/studies/{study}/series/{series}/thumbnail")
@requires("dicomweb.read")
async def thumbnail(request: web.Request) -> web.StreamResponse:
    return await _render(request, thumbnail=True)


async def _render(request: web.Request, thumbnail: bool) -> web.StreamResponse:
    ranges = parse_accept(request.headers.get("Accept"))
    media_type, multipart = choose_media_type(ranges, request.query.get("accept"))
    frame = None
    if "frames" in request.match_info:
        numbers = parse_frame_list(request.match_info["frames"])
        if len(numbers) != 1:
            raise web.HTTPBadRequest(text="render one frame at a time: frames/{n}/rendered")
        frame = numbers[0] - 1
    options = render_options(request.query, media_type, frame, thumbnail)
    stored = await stored_instances(request)
    archive = archive_of(request)
    headers = await run_blocking(request, validators, archive, stored, f"{request.path_qs}|{media_type}|{multipart}")
    if not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    try:
        if multipart and "instance" not in request.match_info:
            return await _render_each(request, archive, stored, options, headers)
        image = await run_blocking(request, render_representative, archive, stored, options)
    except RenderError as exc:
        raise http_error(exc) from exc
    return web.Response(body=image, headers={**headers, "Content-Type": media_type})


def choose_media_type(ranges: list[MediaRange], accept_param: str | None) -> tuple[str, bool]:
    """(image media type, as multipart?) from the Accept header or ``accept`` parameter."""
    if accept_param:
        ranges = parse_accept(accept_param)
    for media in ranges:
        wanted = (media.part_type or "*/*") if media.is_multipart else media.media_type
        if wanted in RENDERED_TYPES:
            return wanted, media.is_multipart
        if wanted in ("*/*", "image/*"):
            return "image/jpeg", media.is_multipart
    raise not_acceptable("a rendered image", RENDERED_TYPES)


def http_error(exc: RenderError) -> web.HTTPException:
    """The HTTP error for a rendering that cannot be made (400, 404 or 406)."""
    kind = {404: web.HTTPNotFound, 406: web.HTTPNotAcceptable}.get(exc.status, web.HTTPBadRequest)
    return kind(text=str(exc))


def render_options(query: MultiMapping[str], media_type: str, frame: int | None, thumbnail: bool) -> RenderOptions:
    try:
        window = parse_window(query["window"]) if query.get("window") else None
        viewport = parse_viewport(query["viewport"]) if query.get("viewport") else None
        quality = parse_quality(query["quality"]) if query.get("quality") else None
    except RenderError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    if thumbnail:
        return RenderOptions(media_type, window, viewport or (THUMBNAIL_SIZE, THUMBNAIL_SIZE),
                             quality or THUMBNAIL_QUALITY, frame if frame is not None else 0)
    return RenderOptions(media_type, window, viewport, quality or 90, frame)


def render_representative(archive: Archive, stored: list[StoredInstance], options: RenderOptions) -> bytes:
    """The rendering of the first instance with an image, starting from the middle of
    the first series (the usual representative slice)."""
    first_series = [s for s in stored if s.series_uid == stored[0].series_uid]
    middle = len(first_series) // 2
    ordered = first_series[middle:] + first_series[:middle] + [s for s in stored if s not in first_series]
    last: RenderError | None = None
    for item in ordered:
        try:
            with archive.open_instance(item) as fh:
                return render(fh, options)
        except NoImage as exc:
            last = exc
    raise last or NoImage("nothing here has an image to render")


async def _render_each(request: web.Request, archive: Archive, stored: list[StoredInstance],
                       options: RenderOptions, headers: dict[str, str]) -> web.StreamResponse:
    images = []
    for item in stored:
        try:
            images.append(await run_blocking(request, render_representative, archive, [item], options))
        except NoImage:
            continue
    if not images:
        raise http_error(NoImage("no instance here has an image to render; retrieve it as application/dicom"))
    stream = MultipartStream(request, options.media_type, headers)
    for image in images:
        await stream.write_part(options.media_type, image)
    return await stream.finish()
