"""Who is calling, and may they do this. Every route family asks here, nowhere else.

Routes declare what they need with :func:`requires` (a scope, or admin) or mark
themselves :func:`public` (only what a seed marks public). The middleware resolves the
credentials once per request into a :class:`Principal` kept on the request, lets the
identity service admit it (per-plan rate limit, usage counters) and, once the handler
has answered, has the request appended to the audit log with its outcome. Families get
all of this by being routes; they only call :func:`principal` to learn the caller's
organizations, and :func:`audit_study` when the study a request touched is not in its
URL.

With ``[auth] required = false`` every caller is the anonymous principal, which may do
everything in every organization (trusted networks only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, runtime_checkable

from aiohttp import web

from storage import ArchiveError
from storage.identity import SCOPES

from .errors import status_for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# request keys
PRINCIPAL = web.RequestKey("dicomnode.principal", object)  # a Principal
AUTH_FAILURE = web.RequestKey("dicomnode.auth_failure", str)  # why presented credentials were refused
AUDIT_ACTOR = web.RequestKey("dicomnode.audit_actor", tuple)  # who a public route (a token endpoint) acted for
AUDIT_STUDY = web.RequestKey("dicomnode.audit_study", object)  # the study a request touched, when not in its URL

__all__ = [
    "ANONYMOUS", "AUDIT_ACTOR", "AUDIT_STUDY", "AUTH_FAILURE", "Authenticator", "PRINCIPAL", "Principal",
    "RequestRecorder", "SCOPES", "audit_as", "audit_study", "make_auth_middleware", "principal", "public",
    "requires",
]


@dataclass(frozen=True)
class Principal:
    kind: str  # anonymous, user, client, api_key
    subject: str  # email, client id or key name
    organization: str | None  # None only for the anonymous principal
    scopes: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    plan: str | None = None
    credential_id: str | None = None  # user:<pk>, client:<id> or key:<pk>, for quotas and audit
    user_pk: int | None = None  # the developer account behind a user token or its keys

    @property
    def organizations(self) -> tuple[str, ...] | None:
        """Organizations whose data this principal sees; None = all (auth off)."""
        if self.kind == "anonymous":
            return None
        return (self.organization,) if self.organization else ()

    @property
    def storing_organization(self) -> str:
        return self.organization or "local"

    @property
    def usage_owner(self) -> str | None:
        """Whose usage counters a call adds to: the developer, else the credential."""
        return f"user:{self.user_pk}" if self.user_pk is not None else self.credential_id

    def has_scope(self, scope: str) -> bool:
        return self.kind == "anonymous" or self.admin or scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", "anonymous", None, frozenset(SCOPES), admin=True)


class Authenticator(Protocol):
    """Turns a request's credentials into a principal (None: no or bad credentials; the
    reason, if any, goes in ``request[AUTH_FAILURE]``)."""

    def authenticate(self, request: web.Request) -> Awaitable[Principal | None]: ...


@runtime_checkable
class RequestRecorder(Protocol):
    """What an authenticator may also do around each request."""

    async def admit(self, request: web.Request, who: Principal) -> None:
        """Before the handler: refuse (429) over the rate, count the call."""

    async def record(self, request: web.Request, who: Principal | None, status: int) -> None:
        """After the handler: append the request and its outcome to the audit log."""


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
        failure = request.get(AUTH_FAILURE)
        challenge = 'Bearer realm="dicomnode"'
        if failure:
            challenge += f', error="invalid_token", error_description="{failure}"'
        raise web.HTTPUnauthorized(
            text=failure or "credentials required: send Authorization: Bearer <token or API key>",
            headers={"WWW-Authenticate": challenge},
        )
    return who


def audit_study(request: web.Request, study_uid: str) -> None:
    """Name the study a request touched, for its audit row (when it is not in the URL)."""
    request[AUDIT_STUDY] = study_uid


def audit_as(request: web.Request, actor: str, actor_kind: str, organization: str | None = None) -> None:
    """Have a public route's request audited under the identity it acted for."""
    request[AUDIT_ACTOR] = (actor, actor_kind, organization)


def _is_public(request: web.Request) -> bool:
    handler = request.match_info.handler
    return getattr(handler, "__dicomnode_public__", False) or request.method == "OPTIONS"


def _is_audited(request: web.Request, status: int) -> bool:
    """Every request that is not an anonymous call to a public route; deletions and
    refusals (401, 403: refused credentials included) always."""
    who = request.get(PRINCIPAL)
    return (
        not _is_public(request)
        or (who is not None and who.kind != "anonymous")
        or AUDIT_ACTOR in request
        or request.method == "DELETE"
        or status in (401, 403)
    )


async def _identify(request: web.Request, required: bool, authenticator: Authenticator | None) -> None:
    if not required:
        request[PRINCIPAL] = ANONYMOUS
        return
    if authenticator is not None and "Authorization" in request.headers:
        who = await authenticator.authenticate(request)
        if who is not None:
            request[PRINCIPAL] = who
    if PRINCIPAL not in request and not _is_public(request):
        principal(request)  # raises 401


def make_auth_middleware(required: bool, authenticator: Authenticator | None):
    recorder = authenticator if isinstance(authenticator, RequestRecorder) else None

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            await _identify(request, required, authenticator)
            if recorder is not None and PRINCIPAL in request:
                await recorder.admit(request, request[PRINCIPAL])
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except ArchiveError as exc:
            status = status_for(exc)
            raise
        finally:
            if recorder is not None and _is_audited(request, status):
                await recorder.record(request, request.get(PRINCIPAL), status)

    return auth_middleware
