"""Who is calling, and may they do this. Every route family asks here, nowhere else.

Routes declare what they need with :func:`requires` (a scope, or admin) or mark
themselves :func:`public` (only what a seed marks public). The middleware resolves the
credentials once per request into a :class:`Principal` kept on the request.

With ``[auth] required = false`` every caller is the anonymous principal, which may do
everything in every organization (trusted networks only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SCOPES = ("upload", "reports", "status", "dicomweb.read", "dicomweb.write", "worklist", "admin")
PRINCIPAL = "dicomnode.principal"  # request key


@dataclass(frozen=True)
class Principal:
    kind: str  # anonymous, user, client, api_key
    subject: str  # email, client id or key name
    organization: str | None  # None only for the anonymous principal
    scopes: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    plan: str | None = None
    credential_id: str | None = None  # key or client id, for quotas and audit

    @property
    def organizations(self) -> tuple[str, ...] | None:
        """Organizations whose data this principal sees; None = all (auth off)."""
        if self.kind == "anonymous":
            return None
        return (self.organization,) if self.organization else ()

    @property
    def storing_organization(self) -> str:
        return self.organization or "local"

    def has_scope(self, scope: str) -> bool:
        return self.kind == "anonymous" or self.admin or scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", "anonymous", None, frozenset(SCOPES), admin=True)


class Authenticator(Protocol):
    """Turns a request's credentials into a principal (None: no or bad credentials)."""

    def authenticate(self, request: web.Request) -> Awaitable[Principal | None]: ...


def public(handler: Handler) -> Handler:
    """Mark a route as needing no credentials."""
    handler.__dicomnode_public__ = True  # type: ignore[attr-defined]
    return handler


def requires(scope: str | None = None, *, admin: bool = False) -> Callable[[Handler], Handler]:
    """A route needs credentials, and ``scope`` (or the admin role) if given."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            who = principal(request)
            if admin and not (who.admin or "admin" in who.scopes):
                raise web.HTTPForbidden(text="this call needs an admin credential")
            if scope is not None and not who.has_scope(scope):
                raise web.HTTPForbidden(text=f"this call needs the {scope!r} scope")
            return await handler(request)

        return checked

    return wrap


def principal(request: web.Request) -> Principal:
    who = request.get(PRINCIPAL)
    if who is None:
        raise web.HTTPUnauthorized(
            text="credentials required: send Authorization: Bearer <token or API key>",
            headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'},
        )
    return who


def _is_public(request: web.Request) -> bool:
    handler = request.match_info.handler
    return getattr(handler, "__dicomnode_public__", False) or request.method == "OPTIONS"


def make_auth_middleware(required: bool, authenticator: Authenticator | None):
    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not required:
            request[PRINCIPAL] = ANONYMOUS
            return await handler(request)
        if authenticator is not None and "Authorization" in request.headers:
            who = await authenticator.authenticate(request)
            if who is not None:
                request[PRINCIPAL] = who
        if PRINCIPAL not in request and not _is_public(request):
            principal(request)  # raises 401
        return await handler(request)

    return auth_middleware
