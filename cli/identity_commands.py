"""``dicomnode user add``, ``client add``, ``key add`` / ``list`` / ``delete`` and ``audit``:
the operator's side of the identity store. They open only the index (never the blob
store), so they are safe to run beside a serving node; each change is audited."""
from __future__ import annotations

import argparse
import functools
import getpass
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from config import Settings
from storage import ArchiveError
from storage.identity import PLANS, SCOPES, AuditEntry, IdentityStore, InvalidIdentityInput, parse_time
from storage.schema import MIGRATION_SETS
from storage.sqlite_index import SQLiteIndex

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_identity_commands(sub: argparse._SubParsersAction,
                          config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    _user_commands(sub, config_arg)
    _client_commands(sub, config_arg)
    _key_commands(sub, config_arg)
    audit = sub.add_parser("audit", help="read the audit log (newest first)",
                           description="Print audit log rows, newest first, filtered by time, actor or study.")
    config_arg(audit)
    audit.add_argument("--since", help="rows at or after this time (ISO 8601 or epoch seconds)")
    audit.add_argument("--until", help="rows before this time (ISO 8601 or epoch seconds)")
    audit.add_argument("--actor", help="email, client id, key name or calling AE title")
    audit.add_argument("--study", help="StudyInstanceUID")
    audit.add_argument("--organization", help="only this organization's rows")
    audit.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=cmd_audit)


def _group(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    return actions


def _user_commands(sub, config_arg) -> None:
    add = _group(sub, "user", "manage accounts (for the token endpoints)").add_parser(
        "add", help="create an account", description="Create an account for POST /api/token/.")
    config_arg(add)
    add.add_argument("email")
    add.add_argument("--password", required=True, help="the password (at least 8 characters); - reads it from stdin")
    add.add_argument("--admin", action="store_true", help="the account may call admin routes of its organization")
    add.add_argument("--org", default="local", help="its organization (default: local)")
    add.set_defaults(func=cmd_user_add)


def _client_commands(sub, config_arg) -> None:
    add = _group(sub, "client", "manage OAuth2 clients (client credentials at /oauth2/token)").add_parser(
        "add", help="create an OAuth2 client; prints client_id and client_secret once",
        description="Create an OAuth2 client; its secret is printed once and kept only hashed.")
    config_arg(add)
    add.add_argument("name")
    add.add_argument("--org", required=True, help="its organization")
    add.add_argument("--scopes", required=True, help=f"space-separated, from: {' '.join(SCOPES)}")
    add.set_defaults(func=cmd_client_add)


def _key_commands(sub, config_arg) -> None:
    keys = _group(sub, "key", "manage API keys")
    add = keys.add_parser("add", help="create an API key; prints it once",
                          description="Create an API key; it is printed once and kept only hashed.")
    config_arg(add)
    add.add_argument("name")
    add.add_argument("--org", required=True, help="its organization")
    add.add_argument("--plan", choices=PLANS, default="developer", help="rate limit plan (default: developer)")
    add.add_argument("--admin", action="store_true", help="the key may delete and call admin routes")
    add.add_argument("--scopes", help=f"space-separated (default: all but admin), from: {' '.join(SCOPES)}")
    add.set_defaults(func=cmd_key_add)
    listing = keys.add_parser("list", help="list API keys (never their secret)", description="List API keys.")
    config_arg(listing)
    listing.set_defaults(func=cmd_key_list)
    delete = keys.add_parser("delete", help="delete an API key; it stops working at once",
                             description="Delete an API key by id; it stops working at once.")
    config_arg(delete)
    delete.add_argument("id", type=int)
    delete.set_defaults(func=cmd_key_delete)


# --------------------------------------------------------------------------- commands


def _reporting_errors(command: Callable[[argparse.Namespace, Settings], int]):
    """Print the store's refusal; bad input exits 2, conflicts and unknown ids exit 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return command(args, settings)
        except ArchiveError as exc:
            print(f"dicomnode {args.command}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, InvalidIdentityInput) else EXIT_FAILURE

    return run


@_reporting_errors
def cmd_user_add(args: argparse.Namespace, settings: Settings) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password == "-" else args.password
    with _identity(settings) as store:
        user = store.create_user(args.email, password, organization=args.org, admin=args.admin)
        _audit(store, "user add", user.email, user.organization)
    print(f"account {user.email} created (organization {user.organization}{', admin' if user.admin else ''})")
    return EXIT_OK


@_reporting_errors
def cmd_client_add(args: argparse.Namespace, settings: Settings) -> int:
    with _identity(settings) as store:
        client, secret = store.create_client(args.name, organization=args.org, scopes=args.scopes.split())
        _audit(store, "client add", client.client_id, client.organization)
    print(f"client_id: {client.client_id}")
    print(f"client_secret: {secret}")
    print(f"scopes: {' '.join(client.scopes)} (organization {client.organization}); "
          "the secret is shown only now", file=sys.stderr)
    return EXIT_OK


@_reporting_errors
def cmd_key_add(args: argparse.Namespace, settings: Settings) -> int:
    options = {"scopes": args.scopes.split()} if args.scopes is not None else {}
    with _identity(settings) as store:
        record, key = store.create_api_key(args.name, organization=args.org, plan=args.plan, admin=args.admin,
                                           **options)
        _audit(store, "key add", f"{record.name} (id {record.pk})", record.organization)
    print(key)
    print(f"API key {record.pk} {record.name!r}: plan {record.plan}, organization {record.organization}, "
          f"scopes {' '.join(record.scopes)}; the key is shown only now", file=sys.stderr)
    return EXIT_OK


@_reporting_errors
def cmd_key_list(args: argparse.Namespace, settings: Settings) -> int:
    with _identity(settings) as store:
        for key in store.api_keys():
            owner = f" developer {key.user_pk}" if key.user_pk is not None else ""
            print(f"{key.pk}\t{key.name}\t{key.organization}\t{key.plan}\t{'admin' if key.admin else '-'}"
                  f"\t{' '.join(key.scopes)}{owner}")
    return EXIT_OK


@_reporting_errors
def cmd_key_delete(args: argparse.Namespace, settings: Settings) -> int:
    with _identity(settings) as store:
        record = store.delete_api_key(args.id)
        _audit(store, "key delete", f"{record.name} (id {record.pk})", record.organization)
    print(f"API key {record.pk} {record.name!r} deleted")
    return EXIT_OK


@_reporting_errors
def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    with _identity(settings) as store:
        entries = store.audit_entries(since=since, until=until, actor=args.actor, study_uid=args.study,
                                      organizations=(args.organization,) if args.organization else None,
                                      limit=args.limit)
    for entry in entries:
        print(json.dumps(entry.as_json()) if args.json else _audit_line(entry))
    return EXIT_OK


def _audit_line(entry: AuditEntry) -> str:
    row = entry.as_json()
    fields = (row["time"], entry.channel, entry.outcome, f"{entry.actor or '-'} ({entry.actor_kind})",
              entry.organization or "-", entry.action, entry.study_uid or "-", entry.remote or "-", entry.detail)
    return "  ".join(fields).rstrip()


# --------------------------------------------------------------------------- plumbing


@contextmanager
def _identity(settings: Settings) -> Iterator[IdentityStore]:
    index = SQLiteIndex(Path(settings.storage.path) / "index.sqlite", MIGRATION_SETS)
    try:
        yield IdentityStore(index)
    finally:
        index.close()


def _audit(store: IdentityStore, action: str, subject: str, organization: str | None) -> None:
    store.append_audit(AuditEntry(time.time(), "cli", _operator(), "operator", organization, action, None, "ok",
                                  "", subject))


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


