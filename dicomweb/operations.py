"""Operational routes: liveness and Prometheus metrics."""
from __future__ import annotations

import asyncio
import ipaddress

from aiohttp import web

from .auth import public
from .keys import ARCHIVE, EXECUTOR, SETTINGS

routes = web.RouteTableDef()


@routes.get("/healthz")
@public
async def healthz(request: web.Request) -> web.Response:
    """Public liveness probe: the process answers and the index is readable."""
    archive = request.app[ARCHIVE]
    counts = await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], archive.counts)
    return web.json_response({"status": "ok", "instances": counts["instances"]})


@routes.get("/metrics")
@public
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. With ``[auth] required`` it answers loopback scrapers only."""
    if request.app[SETTINGS].auth.required and not _is_loopback(request.remote):
        raise web.HTTPForbidden(text="/metrics answers loopback clients only while [auth] required = true")
    text = request.app[ARCHIVE].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
