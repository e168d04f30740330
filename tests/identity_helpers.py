"""Credentials for tests against a real node, and the access matrix every family's
routes should pass: no credentials / bad token / expired token / another organization's
credential / wrong scope / right credential -> 401 / 401 / 401 / 404 / 403 / success,
with an audit row for each.

A family whose route reads organization-owned data stores that data as organization
"local" (``Source(..., organization="local")``, the right credential's organization) and
calls ``check_access_matrix(credentials, "GET", f"/dicomweb/studies/{uid}/metadata",
scope="dicomweb.read", other_organization=True)``: a key of organization "elsewhere"
must then get 404."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

from dicomweb.tokens import ACCESS, signer_for
from storage.identity import DEFAULT_SCOPES

PASSWORD = "correct horse battery staple"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@dataclass
class Credentials:
    """Makes accounts, keys and tokens on a running node (tests.conftest.NodeThread)."""

    node: Any

    @property
    def store(self):
        return self.node.archive.identity

    def url(self, path: str) -> str:
        return self.node.base_url + path

    def user_token(self, email: str, *, organization: str = "local", admin: bool = False) -> str:
        self.store.create_user(email, PASSWORD, organization=organization, admin=admin)
        answer = requests.post(self.url("/api/token/"), json={"email": email, "password": PASSWORD}, timeout=30)
        answer.raise_for_status()
        return answer.json()["access"]

    def api_key(self, *, organization: str = "local", plan: str = "enterprise", admin: bool = False,
                scopes: tuple[str, ...] = DEFAULT_SCOPES, name: str = "test key") -> str:
        return self.store.create_api_key(name, organization=organization, plan=plan, admin=admin, scopes=scopes)[1]

    def client_token(self, scopes: tuple[str, ...], *, organization: str = "local") -> str:
        client, secret = self.store.create_client("test client", organization=organization, scopes=scopes)
        answer = requests.post(self.url("/oauth2/token"), auth=(client.client_id, secret),
                               data={"grant_type": "client_credentials"}, timeout=30)
        answer.raise_for_status()
        return answer.json()["access_token"]

    def expired_token(self, scopes: tuple[str, ...], *, organization: str = "local") -> str:
        client, _ = self.store.create_client("expired client", organization=organization, scopes=scopes)
        signer = signer_for(self.node.settings)
        return signer.issue(f"client:{client.client_id}", ACCESS, 3600, scopes=scopes, now=time.time() - 7200)

    def audit_count(self) -> int:
        return len(self.store.audit_entries(limit=100_000))


@dataclass(frozen=True)
class Case:
    name: str
    headers: dict[str, str]
    expected: int


def matrix_cases(credentials: Credentials, scope: str | None, *, admin: bool, success: int,
                 other_organization: bool) -> list[Case]:
    """The cases of the access matrix for a route that needs ``scope`` (or admin)."""
    right = credentials.api_key(admin=admin, scopes=(scope,) if scope else DEFAULT_SCOPES)
    wrong_scopes = tuple(s for s in DEFAULT_SCOPES if s != scope)[:1]
    cases = [
        Case("no credentials", {}, 401),
        Case("bad token", bearer("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bm9wZQ"), 401),
        Case("expired token", bearer(credentials.expired_token((scope or "status",))), 401),
        Case("right credential", bearer(right), success),
    ]
    if scope or admin:
        cases.insert(3, Case("wrong scope", bearer(credentials.client_token(wrong_scopes)), 403))
    if other_organization:
        other = credentials.api_key(organization="elsewhere", admin=admin, scopes=(scope,) if scope else DEFAULT_SCOPES)
        cases.insert(3, Case("other organization", bearer(other), 404))
    return cases


def check_access_matrix(credentials: Credentials, method: str, path: str, *, scope: str | None = None,
                        admin: bool = False, success: int = 200, other_organization: bool = False,
                        **request: Any) -> dict[str, int]:
    """Run every case against ``method path``; returns {case: status} and asserts each
    status and that each request added exactly one audit row naming the route."""
    outcomes = {}
    for case in matrix_cases(credentials, scope, admin=admin, success=success,
                             other_organization=other_organization):
        before = credentials.audit_count()
        answer = requests.request(method, credentials.url(path), headers=case.headers, timeout=30, **request)
        outcomes[case.name] = answer.status_code
        assert answer.status_code == case.expected, (case.name, answer.status_code, answer.text)
        rows = credentials.store.audit_entries(limit=credentials.audit_count() - before)
        expected_row = (f"{method} {path.split('?')[0]}", str(case.expected))
        assert [(r.action, r.outcome) for r in rows] == [expected_row], case.name
    return outcomes
