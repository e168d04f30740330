"""CORS for browser viewers on other origins (``[http] cors_origins`` in ae.toml).

Only listed origins (or ``"*"``) get the Access-Control headers; a preflight request
(OPTIONS with Access-Control-Request-Method) is answered here without reaching a route."""
from __future__ import annotations

from aiohttp import web

ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept, If-None-Match, If-Modified-Since"
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, ETag, Last-Modified, Location, Warning"
PREFLIGHT_MAX_AGE_S = 600


def make_cors_middleware(origins: tuple[str, ...]):
    allowed = frozenset(origins)

    def allow(origin: str | None) -> str | None:
        if origin is None or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def cors_headers(origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS}
        if origin != "*":
            headers["Vary"] = "Origin"
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    @web.middleware
    async def cors_middleware(request: web.Request, handler):
        origin = allow(request.headers.get("Origin"))
        if origin is None:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                **cors_headers(origin),
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ALLOWED_HEADERS),
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            })
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(cors_headers(origin))
            raise
        if not response.prepared:
            response.headers.update(cors_headers(origin))
        return response

    return cors_middleware
