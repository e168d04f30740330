"""One error middleware: archive errors and HTTP errors become JSON bodies with the
status HTTP and DICOMweb clients expect. Input the client controls never yields 500."""
from __future__ import annotations

import logging

from aiohttp import web

from storage import (
    ArchiveError, Conflict, InvalidInstance, InvalidQuery, NotDicom, NotFound, StorageFailure,
    TooLarge, UnsupportedSOPClass,
)

log = logging.getLogger("dicomnode.http")

HTTP_STATUS: dict[type, int] = {
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    NotDicom: 422,
    UnsupportedSOPClass: 422,
    InvalidInstance: 422,
    InvalidQuery: 400,
    StorageFailure: 503,
}


def status_for(exc: ArchiveError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def json_error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ArchiveError as exc:
        status = status_for(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc.message)
        return json_error(status, exc.message, **{k: v for k, v in exc.details.items() if v is not None})
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = json_error(exc.status, reason)
        for name in ("Allow", "Retry-After", "WWW-Authenticate", "Location"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
