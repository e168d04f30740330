"""The aiohttp app factory. Route families register from one list; every family module
exposes ``routes`` (a ``web.RouteTableDef``)."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

from aiohttp import web

from config import Settings
from storage import Archive

from . import identity_routes, operations, qido, rendered, stow, ups_rs, wado, wado_uri, workitems_api
from .cors import CorsPolicy, install_cors
from .auth import make_auth_middleware
from .credentials import IdentityService
from .errors import error_middleware
from .keys import API_LIMITER, ARCHIVE, EXECUTOR, LOGIN_LIMITER, SETTINGS, TOKEN_SIGNER
from .limits import RateLimiter
from .tokens import signer_for

log = logging.getLogger("dicomnode.http")

# Route families, in the order they are matched.
FAMILIES = (operations, identity_routes, stow, qido, wado, rendered, wado_uri, workitems_api, ups_rs)


@web.middleware
async def access_log_middleware(request: web.Request, handler):
    started = time.perf_counter()
    status = 500
    archive = request.app[ARCHIVE]
    # a WebSocket stays open while idle: not work that background tasks should wait for
    foreground = request.headers.get("Upgrade", "").lower() != "websocket"
    if foreground:
        archive.foreground.begin()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if foreground:
            archive.foreground.end()
        archive.metrics.inc(
            "dicomnode_http_requests_total", family=_family(request.path), status=str(status)
        )
        log.debug("%s %s %s -> %d in %.1f ms", request.remote, request.method, request.path, status,
                  (time.perf_counter() - started) * 1000)


def _family(path: str) -> str:
    parts = path.strip("/").split("/")
    return parts[0] or "root"


def create_app(settings: Settings, archive: Archive, rate_limiters: Mapping[str, Any] | None = None) -> web.Application:
    """The node's HTTP app. ``rate_limiters`` (``login``, ``api``): limiters to count
    against instead of this app's own (a worker process counts in the serving one's)."""
    limiters = rate_limiters or {"login": RateLimiter(), "api": RateLimiter()}
    signer = signer_for(settings)
    authenticator = IdentityService(archive.identity, signer, limiters["api"])
    cors = CorsPolicy(settings.http.cors_origins)
    app = web.Application(
        middlewares=[
            access_log_middleware,
            cors.middleware(),
            error_middleware,
            make_auth_middleware(settings.auth.required, authenticator),
        ],
        client_max_size=settings.http.max_request_mb * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[ARCHIVE] = archive
    app[TOKEN_SIGNER] = signer
    app[LOGIN_LIMITER] = limiters["login"]
    app[API_LIMITER] = limiters["api"]
    install_cors(app, cors)

    async def executor_ctx(app: web.Application):
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="http-archive")
        app[EXECUTOR] = pool
        yield
        pool.shutdown(wait=True)

    app.cleanup_ctx.append(executor_ctx)
    for family in FAMILIES:
        app.add_routes(family.routes)
        if hasattr(family, "setup"):  # a family owning resources (cleanup_ctx) sets them up
            family.setup(app)
    return app
