"""The identity service: the Authenticator the auth middleware plugs in.

``Authorization: Bearer <jwt>`` (a user's access token or an OAuth2 client token),
``Authorization: Bearer <api key>`` and ``Authorization: ApiKey <api key>`` become a
:class:`Principal`. Each lookup reads the store, so a deleted key or client stops
working at once. Around the handler it applies the plan's rate limit, counts usage and
appends the audit row.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

from aiohttp import web

from storage import ArchiveError
from storage.identity import DEFAULT_SCOPES, AuditEntry, IdentityStore

from .auth import AUDIT_ACTOR, AUDIT_STUDY, AUTH_FAILURE, Principal
from .keys import EXECUTOR
from .limits import RateLimiter, plan
from .tokens import ACCESS, InvalidToken, TokenSigner, looks_like_jwt

log = logging.getLogger("dicomnode.auth")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_STUDY_PARAMETERS = ("study_uid", "studyUID", "StudyInstanceUID", "study")


class IdentityService:
    def __init__(self, store: IdentityStore, signer: TokenSigner, limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.signer = signer
        self.limiter = limiter or RateLimiter()

    # ------------------------------------------------------------------ authenticate
    async def authenticate(self, request: web.Request) -> Principal | None:
        scheme, _, credential = request.headers.get("Authorization", "").strip().partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        if not credential or scheme not in ("bearer", "apikey"):
            request[AUTH_FAILURE] = "send Authorization: Bearer <token or API key> or ApiKey <API key>"
            return None
        if scheme == "bearer" and looks_like_jwt(credential):
            who = await in_thread(request, self._from_token, credential, request)
        else:
            who = await in_thread(request, self._from_api_key, credential)
            if who is None:
                request[AUTH_FAILURE] = "the API key is not valid"
        return who

    def _from_token(self, token: str, request: web.Request) -> Principal | None:
        try:
            claims = self.signer.verify(token, ACCESS)
        except InvalidToken as exc:
            request[AUTH_FAILURE] = str(exc)
            return None
        kind, _, ident = claims.subject.partition(":")
        who = self._user_principal(ident) if kind == "user" else (
            self._client_principal(ident, claims.scopes) if kind == "client" else None)
        if who is None:
            request[AUTH_FAILURE] = "the account or client of this token no longer exists"
        return who

    def _user_principal(self, ident: str) -> Principal | None:
        user = self.store.user(int(ident)) if ident.isdigit() else None
        if user is None:
            return None
        scopes = frozenset(DEFAULT_SCOPES) | ({"admin"} if user.admin else set())
        return Principal("user", user.email, user.organization, scopes, admin=user.admin,
                         credential_id=f"user:{user.pk}", user_pk=user.pk)

    def _client_principal(self, client_id: str, token_scopes: tuple[str, ...]) -> Principal | None:
        client = self.store.client(client_id)
        if client is None:
            return None
        scopes = frozenset(token_scopes) & frozenset(client.scopes)
        return Principal("client", client.client_id, client.organization, scopes, admin="admin" in scopes,
                         credential_id=f"client:{client.client_id}")

    def _from_api_key(self, key: str) -> Principal | None:
        record = self.store.check_api_key(key)
        if record is None:
            return None
        return Principal("api_key", record.name, record.organization, frozenset(record.scopes), admin=record.admin,
                         plan=record.plan, credential_id=f"key:{record.pk}", user_pk=record.user_pk)

    # ------------------------------------------------------------------ around the handler
    async def admit(self, request: web.Request, who: Principal) -> None:
        """Refuse (429, Retry-After) an API key over its plan's rate."""
        limits = plan(who.plan)
        if limits is None or who.credential_id is None:
            return
        wait = self.limiter.retry_after(who.credential_id, limits.requests_per_minute)
        if wait is not None:
            raise web.HTTPTooManyRequests(
                text=f"rate limit of the {limits.name} plan ({limits.requests_per_minute} requests/min) "
                f"exceeded; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    async def record(self, request: web.Request, who: Principal | None, status: int) -> None:
        """Append the audit row and count the call against its owner, in one transaction.
        A failure is logged; the answer already given stands."""
        usage = None
        if who is not None and who.usage_owner is not None and request.match_info.route.resource is not None:
            usage = (who.usage_owner, request.match_info.route.resource.canonical)
        try:
            await in_thread(request, self.store.record_request, audit_entry(request, who, status), usage)
        except ArchiveError as exc:
            log.error("could not audit %s %s: %s", request.method, request.path, exc.message)


def audit_entry(request: web.Request, who: Principal | None, status: int) -> AuditEntry:
    if who is not None:
        actor, kind, organization = who.subject, who.kind, who.organization
    else:
        actor, kind, organization = request.get(AUDIT_ACTOR, ("", "none", None))
    return AuditEntry(
        at=time.time(),
        channel="http",
        actor=actor,
        actor_kind=kind,
        organization=organization,
        action=f"{request.method} {request.path}",
        study_uid=study_of(request),
        outcome=str(status),
        remote=request.remote or "",
        detail=request.get(AUTH_FAILURE, "") if status == 401 and AUDIT_ACTOR not in request else "",
    )


def study_of(request: web.Request) -> str | None:
    """The study a request addressed: set by its handler, in its URL, or as a parameter."""
    if AUDIT_STUDY in request:
        return request[AUDIT_STUDY]
    for name, value in request.match_info.items():
        if "study" in name.lower() and _UID.match(value):
            return value
    for name in _STUDY_PARAMETERS:
        value = request.query.get(name, "")
        if _UID.match(value):
            return value
    return None


async def in_thread(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking store call off the event loop, on the app's archive pool."""
    return await asyncio.get_running_loop().run_in_executor(request.app[EXECUTOR], fn, *args)
