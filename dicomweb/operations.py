"""Operational routes: liveness and Prometheus metrics."""
from __future__ import annotations

import asyncio

from aiohttp import web

from .auth import public, requires
from .keys import ARCHIVE, EXECUTOR

routes = web.RouteTableDef()


@routes.get("/healthz")
@public
async def healthz(request: web.Request) -> web.Response:
    """Public liveness probe: the process answers and the index is readable."""
    archive = request.app[ARCHIVE]
    counts = await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], archive.counts)
    return web.json_response({"status": "ok", "instances": counts["instances"]})


@routes.get("/metrics")
@requires(admin=True)
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. With ``[auth] required`` a scraper sends an admin
    credential (Prometheus: ``authorization: {credentials: <API key>}``)."""
    text = request.app[ARCHIVE].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")
