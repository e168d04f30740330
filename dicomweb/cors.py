"""CORS for browser viewers on other origins (``[http] cors_origins`` in ae.toml).

Only listed origins (or ``"*"``) get the Access-Control headers. A preflight request
(OPTIONS with Access-Control-Request-Method) is answered by the middleware without
reaching a route or needing credentials; every other answer, streamed ones and errors
included, gets its headers as it is prepared (``on_response_prepare``)."""
from __future__ import annotations

from aiohttp import web

ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept, If-None-Match, If-Modified-Since"
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, ETag, Last-Modified, Location, Warning"
PREFLIGHT_MAX_AGE_S = 600


class CorsPolicy:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = frozenset(origins)

    def allowed_origin(self, request: web.BaseRequest) -> str | None:
        """The Access-Control-Allow-Origin value for this request, or None."""
        origin = request.headers.get("Origin")
        if origin is None or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin in self.origins else None

    @staticmethod
    def headers(origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED_HEADERS}
        if origin != "*":
            headers["Vary"] = "Origin"
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def middleware(self):
        @web.middleware
        async def cors_preflight_middleware(request: web.Request, handler):
            origin = self.allowed_origin(request)
            if origin is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": ALLOWED_METHODS,
                    "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ALLOWED_HEADERS),
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                })
            return await handler(request)

        return cors_preflight_middleware

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self.allowed_origin(request)
        if origin is not None:
            response.headers.update(self.headers(origin))


def install_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Add the CORS headers to every answer of ``app`` (the middleware goes in the list)."""
    app.on_response_prepare.append(policy.on_response_prepare)
