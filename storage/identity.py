"""The identity store: users, organizations, OAuth2 clients, API keys, developer
profiles, usage counters and the audit log, in the archive database.

Every HTTP family and the DIMSE node ask here "who is this, which organization". Writes
go through the index's one writer thread (:meth:`SQLiteIndex.write`); reads use the
per-thread reader. Secrets are never stored: passwords as scrypt hashes, API keys and
client secrets (random, 190+ bits) as SHA-256 digests, each shown once at creation.
The audit table is append-only (triggers refuse UPDATE and DELETE).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import sqlite_utils
from sqlite_utils.migrations import Migrations

from .errors import ArchiveError, Conflict, NotFound
from .sqlite_index import SQLiteIndex

migrations = Migrations("dicomnode.identity")

PLANS = ("developer", "professional", "enterprise")
SCOPES = ("upload", "reports", "status", "dicomweb.read", "dicomweb.write", "worklist", "admin")
DEFAULT_SCOPES = tuple(s for s in SCOPES if s != "admin")  # what accounts and keys get
DEFAULT_ORGANIZATION = "local"
API_KEY_PREFIX = "dn_"
CLIENT_ID_PREFIX = "dnc_"

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


@migrations()
def m001_identity(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE organizations (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        );
        CREATE TABLE users (
            pk INTEGER PRIMARY KEY,
            email TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT NOT NULL,
            organization TEXT NOT NULL REFERENCES organizations (name),
            admin INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE TABLE developer_profiles (
            user_pk INTEGER PRIMARY KEY REFERENCES users (pk),
            purpose TEXT NOT NULL,
            organization TEXT NOT NULL,  -- as the developer described it; access follows users.organization
            created_at REAL NOT NULL
        );
        CREATE TABLE oauth_clients (
            client_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            organization TEXT NOT NULL REFERENCES organizations (name),
            scopes TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE api_keys (
            pk INTEGER PRIMARY KEY,
            prefix TEXT NOT NULL UNIQUE,
            key_hash TEXT NOT NULL,
            name TEXT NOT NULL,
            organization TEXT NOT NULL REFERENCES organizations (name),
            plan TEXT NOT NULL CHECK (plan IN ('developer', 'professional', 'enterprise')),
            admin INTEGER NOT NULL DEFAULT 0,
            scopes TEXT NOT NULL,
            user_pk INTEGER REFERENCES users (pk),
            created_at REAL NOT NULL
        );
        CREATE INDEX api_keys_user ON api_keys (user_pk);
        CREATE TABLE usage (
            owner TEXT NOT NULL,   -- user:<pk> for a developer, else key:<pk> / client:<id>
            route TEXT NOT NULL,
            day TEXT NOT NULL,     -- UTC, YYYY-MM-DD
            count INTEGER NOT NULL,
            PRIMARY KEY (owner, route, day)
        ) WITHOUT ROWID;
        CREATE TABLE audit (
            pk INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            channel TEXT NOT NULL,          -- http, dimse, cli
            actor TEXT NOT NULL,            -- email, client id, key name, calling AE; '' if unknown
            actor_kind TEXT NOT NULL,       -- user, client, api_key, anonymous, peer, operator, none
            organization TEXT,
            action TEXT NOT NULL,           -- 'GET /api-keys/', 'association', 'user add'
            study_uid TEXT,
            outcome TEXT NOT NULL,          -- HTTP status, 'released' / 'aborted', 'ok'
            remote TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_at ON audit (at);
        CREATE INDEX audit_actor ON audit (actor);
        CREATE INDEX audit_study ON audit (study_uid);
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        """
    )


# --------------------------------------------------------------------------- errors


class InvalidIdentityInput(ArchiveError):
    """A request to create an account, client or key is malformed (bad email, scope...)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class User:
    pk: int
    email: str
    organization: str
    admin: bool


@dataclass(frozen=True)
class DeveloperProfile:
    user_pk: int
    purpose: str
    organization: str


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    name: str
    organization: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class ApiKey:
    pk: int
    name: str
    prefix: str
    organization: str
    plan: str
    admin: bool
    scopes: tuple[str, ...]
    user_pk: int | None
    created_at: float


@dataclass(frozen=True)
class AuditEntry:
    at: float
    channel: str
    actor: str
    actor_kind: str
    organization: str | None
    action: str
    study_uid: str | None
    outcome: str
    remote: str = ""
    detail: str = ""
    pk: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.pk,
            "time": datetime.fromtimestamp(self.at, timezone.utc).isoformat(timespec="milliseconds"),
            "channel": self.channel,
            "actor": self.actor,
            "actor_kind": self.actor_kind,
            "organization": self.organization,
            "action": self.action,
            "study_uid": self.study_uid,
            "outcome": self.outcome,
            "remote": self.remote,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ActivitySummary:
    daily: tuple[tuple[str, int], ...]  # (YYYY-MM-DD, count) for the current month
    monthly_total: int


# --------------------------------------------------------------------------- secrets


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(("scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(digest)))


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """A hash to spend time on for unknown emails, so both answers cost the same."""
    return hash_password(secrets.token_urlsafe(16))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _digest(secret: str) -> str:
    """Digest of a random secret (API key, client secret): fast to check on every request."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_api_key() -> tuple[str, str]:
    prefix = secrets.token_urlsafe(6)
    return prefix, f"{API_KEY_PREFIX}{prefix}.{secrets.token_urlsafe(24)}"


def api_key_prefix(key: str) -> str | None:
    """The lookup part of a presented API key, or None when it is not shaped like one."""
    if not key.startswith(API_KEY_PREFIX) or "." not in key:
        return None
    return key[len(API_KEY_PREFIX):].split(".", 1)[0] or None


# --------------------------------------------------------------------------- validation


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(s for s in scopes if s))
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise InvalidIdentityInput(f"unknown scope {unknown[0]!r}; scopes are {' '.join(SCOPES)}")
    return wanted


def _check_plan(plan: str) -> str:
    if plan not in PLANS:
        raise InvalidIdentityInput(f"unknown plan {plan!r}; plans are {', '.join(PLANS)}")
    return plan


def _check_email(email: str) -> str:
    email = email.strip()
    local, at, domain = email.partition("@")
    if not (local and at and domain) or any(c.isspace() for c in email):
        raise InvalidIdentityInput(f"{email!r} is not an email address")
    return email


def _check_name(what: str, value: str) -> str:
    value = (value or "").strip()
    if not value or len(value) > 200:
        raise InvalidIdentityInput(f"{what} must be 1 to 200 characters")
    return value


def parse_time(text: str) -> float:
    """ISO 8601 (a date, or a date and time; without an offset it is UTC) or epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidIdentityInput(f"{text!r} is not an ISO 8601 time or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d")


def _month_start(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-01")


def _ensure_organization(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO organizations (name, created_at) VALUES (?, ?)", (name, time.time()))


# --------------------------------------------------------------------------- the store


class IdentityStore:
    """Accounts, credentials, usage and audit over the archive's index database."""

    def __init__(self, index: SQLiteIndex) -> None:
        self.index = index

    # -- users
    def create_user(self, email: str, password: str, *, organization: str = DEFAULT_ORGANIZATION,
                    admin: bool = False) -> User:
        email = _check_email(email)
        organization = _check_name("organization", organization)
        if len(password) < 8:
            raise InvalidIdentityInput("the password must have at least 8 characters")
        password_hash = hash_password(password)

        def insert(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM users WHERE email = ?", (email,)).fetchone():
                raise Conflict(f"an account for {email} exists already")
            _ensure_organization(conn, organization)
            return conn.execute(
                "INSERT INTO users (email, password_hash, organization, admin, created_at) VALUES (?, ?, ?, ?, ?)",
                (email, password_hash, organization, int(admin), time.time()),
            ).lastrowid

        return User(self.index.write(insert), email, organization, admin)

    def check_password(self, email: str, password: str) -> User | None:
        """The account if ``password`` is right, else None (same cost either way)."""
        row = self.index.reader().execute(
            "SELECT pk, email, organization, admin, password_hash FROM users WHERE email = ?", (email.strip(),)
        ).fetchone()
        if row is None:
            verify_password(password, _dummy_hash())
            return None
        return User(row[0], row[1], row[2], bool(row[3])) if verify_password(password, row[4]) else None

    def user(self, pk: int) -> User | None:
        row = self.index.reader().execute(
            "SELECT pk, email, organization, admin FROM users WHERE pk = ?", (pk,)
        ).fetchone()
        return User(row[0], row[1], row[2], bool(row[3])) if row else None

    # -- developer profiles
    def create_profile(self, user_pk: int, purpose: str, organization: str) -> DeveloperProfile:
        purpose = _check_name("purpose", purpose)
        organization = _check_name("organization", organization)

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM developer_profiles WHERE user_pk = ?", (user_pk,)).fetchone():
                raise Conflict("this account has a developer profile already")
            conn.execute(
                "INSERT INTO developer_profiles (user_pk, purpose, organization, created_at) VALUES (?, ?, ?, ?)",
                (user_pk, purpose, organization, time.time()),
            )

        self.index.write(insert)
        return DeveloperProfile(user_pk, purpose, organization)

    def profile(self, user_pk: int) -> DeveloperProfile | None:
        row = self.index.reader().execute(
            "SELECT user_pk, purpose, organization FROM developer_profiles WHERE user_pk = ?", (user_pk,)
        ).fetchone()
        return DeveloperProfile(*row) if row else None

    # -- OAuth2 clients
    def create_client(self, name: str, *, organization: str, scopes: Iterable[str]) -> tuple[OAuthClient, str]:
        """A new client and its secret (shown once; only its digest is kept)."""
        name = _check_name("client name", name)
        organization = _check_name("organization", organization)
        wanted = check_scopes(scopes)
        if not wanted:
            raise InvalidIdentityInput("a client needs at least one scope")
        client_id = f"{CLIENT_ID_PREFIX}{secrets.token_urlsafe(12)}"
        secret = secrets.token_urlsafe(32)

        def insert(conn: sqlite3.Connection) -> None:
            _ensure_organization(conn, organization)
            conn.execute(
                "INSERT INTO oauth_clients (client_id, name, secret_hash, organization, scopes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (client_id, name, _digest(secret), organization, " ".join(wanted), time.time()),
            )

        self.index.write(insert)
        return OAuthClient(client_id, name, organization, wanted), secret

    def check_client(self, client_id: str, secret: str) -> OAuthClient | None:
        row = self.index.reader().execute(
            "SELECT client_id, name, organization, scopes, secret_hash FROM oauth_clients WHERE client_id = ?",
            (client_id,),
        ).fetchone()
        if row is None or not hmac.compare_digest(_digest(secret), row[4]):
            return None
        return OAuthClient(row[0], row[1], row[2], tuple(row[3].split()))

    def client(self, client_id: str) -> OAuthClient | None:
        row = self.index.reader().execute(
            "SELECT client_id, name, organization, scopes FROM oauth_clients WHERE client_id = ?", (client_id,)
        ).fetchone()
        return OAuthClient(row[0], row[1], row[2], tuple(row[3].split())) if row else None

    # -- API keys
    def create_api_key(
        self,
        name: str,
        *,
        organization: str,
        plan: str = "developer",
        admin: bool = False,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        user_pk: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret text (shown once; only its digest is kept)."""
        name = _check_name("key name", name)
        organization = _check_name("organization", organization)
        plan = _check_plan(plan)
        wanted = check_scopes(scopes)
        if admin and "admin" not in wanted:
            wanted = (*wanted, "admin")
        prefix, key = _new_api_key()
        created = time.time()

        def insert(conn: sqlite3.Connection) -> int:
            _ensure_organization(conn, organization)
            return conn.execute(
                "INSERT INTO api_keys (prefix, key_hash, name, organization, plan, admin, scopes, user_pk, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (prefix, _digest(key), name, organization, plan, int(admin), " ".join(wanted), user_pk, created),
            ).lastrowid

        pk = self.index.write(insert)
        return ApiKey(pk, name, prefix, organization, plan, admin, wanted, user_pk, created), key

    def check_api_key(self, key: str) -> ApiKey | None:
        """The key's record if ``key`` is a live key, else None. Read on every request, so
        a deleted key stops working at once."""
        prefix = api_key_prefix(key)
        if prefix is None:
            return None
        row = self.index.reader().execute(
            f"SELECT {_KEY_COLUMNS}, key_hash FROM api_keys WHERE prefix = ?", (prefix,)
        ).fetchone()
        if row is None or not hmac.compare_digest(_digest(key), row[-1]):
            return None
        return _api_key(row[:-1])

    def api_keys(self, *, user_pk: int | None = None) -> list[ApiKey]:
        sql = f"SELECT {_KEY_COLUMNS} FROM api_keys"
        params: tuple = ()
        if user_pk is not None:
            sql += " WHERE user_pk = ?"
            params = (user_pk,)
        return [_api_key(row) for row in self.index.reader().execute(sql + " ORDER BY pk", params)]

    def delete_api_key(self, pk: int, *, user_pk: int | None = None) -> ApiKey:
        """Delete a key (of ``user_pk`` when given); another user's key is NotFound."""

        def delete(conn: sqlite3.Connection) -> ApiKey:
            row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE pk = ?", (pk,)).fetchone()
            if row is None or (user_pk is not None and row[7] != user_pk):
                raise NotFound(f"API key {pk} not found")
            conn.execute("DELETE FROM api_keys WHERE pk = ?", (pk,))
            return _api_key(row)

        return self.index.write(delete)

    # -- usage counters
    def count_usage(self, owner: str, route: str, at: float | None = None, calls: int = 1) -> None:
        """Add ``calls`` to ``owner``'s counter of ``route`` for the day of ``at``."""
        self.index.write(lambda conn: _count_usage(conn, owner, route, time.time() if at is None else at, calls))

    def month_usage(self, owner: str, route: str, at: float | None = None) -> int:
        """``owner``'s calls to ``route`` in the month of ``at`` (UTC)."""
        return self.index.reader().execute(
            "SELECT coalesce(sum(count), 0) FROM usage WHERE owner = ? AND route = ? AND day >= ?",
            (owner, route, _month_start(time.time() if at is None else at)),
        ).fetchone()[0]

    def activity_summary(self, owner: str, at: float | None = None) -> ActivitySummary:
        month = _month_start(time.time() if at is None else at)
        rows = self.index.reader().execute(
            "SELECT day, sum(count) FROM usage WHERE owner = ? AND day >= ? GROUP BY day ORDER BY day",
            (owner, month),
        ).fetchall()
        return ActivitySummary(tuple((day, int(n)) for day, n in rows), sum(int(n) for _, n in rows))

    # -- audit
    def append_audit(self, entry: AuditEntry) -> int:
        return self.index.write(lambda conn: _append_audit(conn, entry))

    def record_request(self, entry: AuditEntry, usage: tuple[str, str] | None) -> None:
        """Audit a request and, for ``usage`` = (owner, route), count it: one transaction."""

        def record(conn: sqlite3.Connection) -> None:
            _append_audit(conn, entry)
            if usage is not None:
                _count_usage(conn, *usage, entry.at, 1)

        self.index.write(record)

    def audit_entries(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        actor: str | None = None,
        study_uid: str | None = None,
        organizations: tuple[str, ...] | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Newest first. ``organizations`` None: every row (operators)."""
        where, params = [], []
        for clause, value in (("at >= ?", since), ("at < ?", until), ("actor = ?", actor),
                              ("study_uid = ?", study_uid)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if organizations is not None:
            where.append(f"organization IN ({','.join('?' * len(organizations))})" if organizations else "0")
            params.extend(organizations)
        sql = ("SELECT at, channel, actor, actor_kind, organization, action, study_uid, outcome, remote, detail, pk "
               "FROM audit")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY pk DESC LIMIT ?"
        params.append(limit)
        return [AuditEntry(*row) for row in self.index.reader().execute(sql, params)]


def _append_audit(conn: sqlite3.Connection, entry: AuditEntry) -> int:
    return conn.execute(
        "INSERT INTO audit (at, channel, actor, actor_kind, organization, action, study_uid, outcome, remote, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (entry.at, entry.channel, entry.actor, entry.actor_kind, entry.organization, entry.action, entry.study_uid,
         entry.outcome, entry.remote, entry.detail),
    ).lastrowid


def _count_usage(conn: sqlite3.Connection, owner: str, route: str, at: float, calls: int) -> None:
    conn.execute(
        "INSERT INTO usage (owner, route, day, count) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (owner, route, day) DO UPDATE SET count = count + excluded.count",
        (owner, route, _day(at), calls),
    )


_KEY_COLUMNS = "pk, name, prefix, organization, plan, admin, scopes, user_pk, created_at"


def _api_key(row: tuple) -> ApiKey:
    pk, name, prefix, organization, plan, admin, scopes, user_pk, created_at = row
    return ApiKey(pk, name, prefix, organization, plan, bool(admin), tuple(scopes.split()), user_pk, created_at)
