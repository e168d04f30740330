"""JSON Web Tokens: issued by the token endpoints, checked on every request.

HS256 only (``none`` and every other algorithm are refused, so a token cannot switch the
algorithm), issuer and expiry always checked. The signing secret is ``[auth] secret`` or
one generated once and kept in ``<storage.path>/auth-secret`` with 0600 rights.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from config import Settings

log = logging.getLogger("dicomnode.auth")

ALGORITHM = "HS256"
ISSUER = "dicomnode"
SECRET_FILE = "auth-secret"

ACCESS_TTL_S = 15 * 60  # email + password access tokens (seed 003)
REFRESH_TTL_S = 24 * 3600
CLIENT_TTL_S = 3600  # OAuth2 client-credential tokens: 1 hour (seeds 001, 002)

ACCESS, REFRESH = "access", "refresh"


class InvalidToken(Exception):
    """The token is malformed, badly signed, of the wrong type or expired."""


@dataclass(frozen=True)
class TokenClaims:
    subject: str  # user:<pk> or client:<client id>
    token_type: str
    expires_at: float
    scopes: tuple[str, ...]
    raw: dict[str, Any]


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def issue(self, subject: str, token_type: str, ttl_s: float, *, scopes: tuple[str, ...] = (),
              now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": subject,
            "typ": token_type,
            "iat": issued,
            "exp": issued + int(ttl_s),
            "jti": uuid.uuid4().hex,
        }
        if scopes:
            claims["scope"] = " ".join(scopes)
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str, token_type: str) -> TokenClaims:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["exp", "iat", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidToken("the token is not valid") from exc
        if claims.get("typ") != token_type:
            raise InvalidToken(f"not an {token_type} token")
        return TokenClaims(str(claims["sub"]), token_type, float(claims["exp"]),
                           tuple(str(claims.get("scope", "")).split()), claims)


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and credential.startswith("eyJ")


def signer_for(settings: Settings) -> TokenSigner:
    if settings.auth.secret:
        secret = settings.auth.secret.encode()
        if len(secret) < 32:
            log.warning("[auth] secret is shorter than 32 bytes; HS256 tokens signed with it are weak")
        return TokenSigner(secret)
    return TokenSigner(load_or_create_secret(Path(settings.storage.path) / SECRET_FILE))


def load_or_create_secret(path: Path) -> bytes:
    """The secret kept at ``path``; created (0600, 256 random bits) when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
        fh.flush()
        os.fsync(fh.fileno())
    log.info("generated the token signing secret %s (0600)", path)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
    secret = path.read_text().strip().encode()
    if len(secret) < 32:
        raise RuntimeError(f"the token signing secret in {path} is too short; delete it to generate a new one")
    return secret
