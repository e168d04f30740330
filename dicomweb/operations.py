"""Operational routes: liveness and Prometheus metrics."""
from __future__ import annotations

import asyncio
import ipaddress

from aiohttp import web

from .auth import PRINCIPAL, principal, public
from .keys import ARCHIVE, EXECUTOR, SETTINGS

routes = web.RouteTableDef()


@routes.get("/healthz")
@public
async def healthz(request: web.Request) -> web.Response:
    """Public liveness probe: the process answers and the index is readable."""
    archive = request.app[ARCHIVE]
    counts = await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], archive.counts)
    return web.json_response({"status": "ok", "instances": counts["instances"]})


# Headers a reverse proxy adds: through a proxy on the same host every client is loopback.
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")


@routes.get("/metrics")
@public
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. With ``[auth] required``: an admin credential, or no
    credentials at all from a loopback scraper (not a request forwarded by a proxy).
    Credentials, when sent, are checked like on every other route."""
    if request.app[SETTINGS].auth.required:
        who = request.get(PRINCIPAL)
        if who is None and ("Authorization" in request.headers or not _is_local_scraper(request)):
            principal(request)  # 401, saying why presented credentials were refused
        if who is not None and not (who.admin or "admin" in who.scopes):
            raise web.HTTPForbidden(text="/metrics needs an admin credential")
    text = request.app[ARCHIVE].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _is_local_scraper(request: web.Request) -> bool:
    return _is_loopback(request.remote) and not any(name in request.headers for name in _PROXY_HEADERS)


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
