"""Identity routes: the token endpoints (seed 003 email + password JWTs; RFC 6749 client
credentials for seeds 001 and 002), developer profiles, API keys, the activity summary
(seed 003) and the audit log.

A developer's access (what data a token or key sees) follows the organization of the
account an operator created (``dicomnode user add --org``); the ``organization`` of a
developer profile is the developer's own description and grants nothing.
"""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from storage.identity import ApiKey, IdentityStore, InvalidIdentityInput, check_scopes, parse_time

from .auth import Principal, audit_as, principal, public, requires
from .credentials import in_thread as _in_thread
from .keys import ARCHIVE, LOGIN_LIMITER, TOKEN_SIGNER
from .tokens import ACCESS, ACCESS_TTL_S, CLIENT_TTL_S, REFRESH, REFRESH_TTL_S, InvalidToken

routes = web.RouteTableDef()

AUDIT_PAGE_MAX = 1000
LOGIN_ATTEMPTS_PER_MINUTE = 20  # per client address, over the token endpoints
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # answers that carry secrets


# --------------------------------------------------------------------------- seed 003 tokens


@routes.post("/api/token/")
@public
async def obtain_token(request: web.Request) -> web.Response:
    """Email + password -> access and refresh tokens."""
    body = await _json_object(request)
    email, password = _text(body, "email"), _text(body, "password")
    audit_as(request, email, "user")
    _throttle_logins(request)
    user = await _in_thread(request, _store(request).check_password, email, password)
    if user is None:
        raise web.HTTPUnauthorized(text="no active account found with the given credentials")
    audit_as(request, user.email, "user", user.organization)
    signer = request.app[TOKEN_SIGNER]
    subject = f"user:{user.pk}"
    return web.json_response({
        "refresh": signer.issue(subject, REFRESH, REFRESH_TTL_S),
        "access": signer.issue(subject, ACCESS, ACCESS_TTL_S),
    }, headers=_NO_STORE)


@routes.post("/api/token/refresh/")
@public
async def refresh_token(request: web.Request) -> web.Response:
    """A refresh token -> a new access token (while the account exists)."""
    body = await _json_object(request)
    _throttle_logins(request)
    try:
        claims = request.app[TOKEN_SIGNER].verify(_text(body, "refresh"), REFRESH)
    except InvalidToken as exc:
        raise web.HTTPUnauthorized(text=f"refresh refused: {exc}") from exc
    kind, _, ident = claims.subject.partition(":")
    user = await _in_thread(request, _store(request).user, int(ident)) if kind == "user" and ident.isdigit() else None
    if user is None:
        raise web.HTTPUnauthorized(text="refresh refused: the account no longer exists")
    audit_as(request, user.email, "user", user.organization)
    return web.json_response({"access": request.app[TOKEN_SIGNER].issue(claims.subject, ACCESS, ACCESS_TTL_S)},
                             headers=_NO_STORE)


# --------------------------------------------------------------------------- developer profiles


@routes.post("/api/developer/profiles/")
@requires()
async def create_profile(request: web.Request) -> web.Response:
    who = _account(request)
    body = await _json_object(request)
    profile = await _in_thread(request, _store(request).create_profile, who.user_pk,
                               _text(body, "purpose"), _text(body, "organization"))
    return web.json_response({"purpose": profile.purpose, "organization": profile.organization}, status=201)


@routes.get("/api/developer/profiles/activity-summary/")
@requires()
async def activity_summary(request: web.Request) -> web.Response:
    """This developer's (or credential's) calls this month, per day."""
    owner = principal(request).usage_owner
    summary = await _in_thread(request, _store(request).activity_summary, owner)
    return web.json_response({
        "daily_activity": [{"day": day, "count": count} for day, count in summary.daily],
        "monthly_total": summary.monthly_total,
    })


# --------------------------------------------------------------------------- API keys


@routes.get("/api-keys/")
@requires()
async def list_api_keys(request: web.Request) -> web.Response:
    """The developer's keys (never their secret text). A developer's key may list them."""
    who = principal(request)
    if who.user_pk is None:
        raise web.HTTPForbidden(text="API keys are listed for developer accounts (POST /api/token/)")
    keys = await _in_thread(request, lambda: _store(request).api_keys(user_pk=who.user_pk))
    return web.json_response([_key_json(key) for key in keys])


@routes.post("/api-keys/")
@requires()
async def create_api_key(request: web.Request) -> web.Response:
    """A new key on the developer plan, in the account's organization; shown once."""
    who = _account(request)
    body = await _json_object(request)
    name = _text(body, "name")
    store = _store(request)
    if await _in_thread(request, store.profile, who.user_pk) is None:
        raise web.HTTPForbidden(text="create a developer profile first (POST /api/developer/profiles/)")
    record, key = await _in_thread(
        request, lambda: store.create_api_key(name, organization=who.storing_organization, user_pk=who.user_pk)
    )
    return web.json_response({"id": record.pk, "name": record.name, "key": key}, status=201, headers=_NO_STORE)


@routes.delete("/api-keys/delete/{pk}/")
@requires()
async def delete_api_key(request: web.Request) -> web.Response:
    """Delete one of the developer's keys; it stops working at once."""
    who = _account(request)
    pk = request.match_info["pk"]
    if not pk.isdigit():
        raise web.HTTPNotFound(text=f"API key {pk} not found")
    await _in_thread(request, lambda: _store(request).delete_api_key(int(pk), user_pk=who.user_pk))
    return web.Response(status=204)


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.pk, "name": key.name, "prefix": key.prefix, "plan": key.plan,
            "created": _iso(key.created_at)}


# --------------------------------------------------------------------------- OAuth2 (RFC 6749)


@routes.post("/oauth2/token")
@public
async def oauth2_token(request: web.Request) -> web.Response:
    """Client credentials grant; the client authenticates with HTTP Basic or in the form."""
    form = await _form(request)
    client_id, secret = _basic_credentials(request)
    if client_id is None:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
    return await _client_token(request, client_id, secret, form.get("grant_type", ""), form.get("scope"))


@routes.get("/oauth2/token")
@public
async def oauth2_token_get(request: web.Request) -> web.Response:
    """``GET <oauth2_endpoint>/token`` as seeds 001 and 002 call it: HTTP Basic only, so
    that the secret never sits in a URL (or a log line)."""
    if "client_secret" in request.query:
        audit_as(request, request.query.get("client_id", ""), "client")
        return _oauth_error(400, "invalid_request",
                            "send the client credentials with HTTP Basic, never in the query string")
    client_id, secret = _basic_credentials(request)
    return await _client_token(request, client_id or "", secret or "",
                               request.query.get("grant_type", "client_credentials"), request.query.get("scope"))


async def _client_token(request: web.Request, client_id: str, secret: str, grant_type: str,
                        scope: str | None) -> web.Response:
    audit_as(request, client_id, "client")
    _throttle_logins(request)
    if grant_type != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
    client = await _in_thread(request, _store(request).check_client, client_id, secret) if client_id else None
    if client is None:
        return _oauth_error(401, "invalid_client", "unknown client or wrong secret",
                            {"WWW-Authenticate": 'Basic realm="dicomnode"'})
    audit_as(request, client.client_id, "client", client.organization)
    try:
        wanted = check_scopes(scope.split()) if scope else client.scopes
    except InvalidIdentityInput as exc:
        return _oauth_error(400, "invalid_scope", exc.message)
    if not set(wanted) <= set(client.scopes):
        return _oauth_error(400, "invalid_scope", f"this client may ask for: {' '.join(client.scopes)}")
    token = request.app[TOKEN_SIGNER].issue(f"client:{client.client_id}", ACCESS, CLIENT_TTL_S, scopes=wanted)
    return web.json_response(
        {"access_token": token, "token_type": "Bearer", "expires_in": CLIENT_TTL_S, "scope": " ".join(wanted)},
        headers=_NO_STORE,
    )


def _oauth_error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status,
                             headers={**_NO_STORE, **(headers or {})})


def _basic_credentials(request: web.Request) -> tuple[str | None, str | None]:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        client_id, _, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return unquote(client_id), unquote(secret)  # RFC 6749 2.3.1: form-urlencoded, then Basic


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        return {k: str(v) for k, v in (await _json_object(request)).items()}
    return {k: str(v) for k, v in (await request.post()).items() if isinstance(v, str)}


# --------------------------------------------------------------------------- audit


@routes.get("/api/audit")
@requires(admin=True)
async def audit_log(request: web.Request) -> web.Response:
    """Audit rows of the caller's organization, newest first. Filters: since, until
    (ISO 8601 or epoch seconds), actor, study, limit (<= 1000)."""
    who = principal(request)
    query = request.query
    limit = _int_param(query.get("limit", "100"), "limit")
    if not 1 <= limit <= AUDIT_PAGE_MAX:
        raise web.HTTPBadRequest(text=f"limit must be 1 to {AUDIT_PAGE_MAX}")
    entries = await _in_thread(request, lambda: _store(request).audit_entries(
        since=parse_time(query["since"]) if "since" in query else None,
        until=parse_time(query["until"]) if "until" in query else None,
        actor=query.get("actor"),
        study_uid=query.get("study"),
        organizations=who.organizations,
        limit=limit,
    ))
    return web.json_response({"entries": [entry.as_json() for entry in entries]})


# --------------------------------------------------------------------------- helpers


def _throttle_logins(request: web.Request) -> None:
    """Password and secret guessing: at most LOGIN_ATTEMPTS_PER_MINUTE a minute per address."""
    wait = request.app[LOGIN_LIMITER].retry_after(f"login:{request.remote}", LOGIN_ATTEMPTS_PER_MINUTE)
    if wait is not None:
        raise web.HTTPTooManyRequests(text=f"too many token requests from this address; retry in {wait} s",
                                      headers={"Retry-After": str(wait)})


def _store(request: web.Request) -> IdentityStore:
    return request.app[ARCHIVE].identity


def _account(request: web.Request) -> Principal:
    """The caller, who must be signed in to an account (its access token, not a key)."""
    who = principal(request)
    if who.kind != "user":
        raise web.HTTPForbidden(text="this call needs the access token of your account (POST /api/token/)")
    return who


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise web.HTTPBadRequest(text=f"{name!r} is required (a non-empty string)")
    return value


def _int_param(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
