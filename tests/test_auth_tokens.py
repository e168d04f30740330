"""JWT hygiene and the token endpoints (seed 003 and OAuth2 client credentials)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import time

import jwt
import pytest
import requests

from dicomweb.tokens import SECRET_FILE
from tests.identity_helpers import PASSWORD, Credentials, bearer

SUMMARY = "/api/developer/profiles/activity-summary/"


@pytest.fixture
def credentials(start_node) -> Credentials:
    return Credentials(start_node(auth={"required": True}))


def _secret(credentials: Credentials) -> bytes:
    return (credentials.node.data_dir / SECRET_FILE).read_text().strip().encode()


def _claims(credentials: Credentials, **extra) -> dict:
    user = credentials.store.create_user(f"claims{time.monotonic_ns()}@example.com", PASSWORD)
    now = int(time.time())
    return {"iss": "dicomnode", "sub": f"user:{user.pk}", "typ": "access", "iat": now, "exp": now + 600, **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _summary_status(credentials: Credentials, token: str) -> int:
    return requests.get(credentials.url(SUMMARY), headers=bearer(token)).status_code


def test_properly_signed_token_is_accepted(credentials):
    token = jwt.encode(_claims(credentials), _secret(credentials), algorithm="HS256")
    assert _summary_status(credentials, token) == 200


def test_alg_none_token_is_refused(credentials):
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{_b64(json.dumps(_claims(credentials)).encode())}."
    assert _summary_status(credentials, token) == 401


def test_hs512_token_with_the_right_secret_is_refused(credentials):
    token = jwt.encode(_claims(credentials), _secret(credentials), algorithm="HS512")
    assert _summary_status(credentials, token) == 401


def test_rs256_header_with_hmac_signature_is_refused(credentials):
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(credentials)).encode())
    signature = hmac.new(_secret(credentials), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert _summary_status(credentials, f"{header}.{payload}.{_b64(signature)}") == 401


def test_expired_token_is_refused_with_the_reason(credentials):
    past = int(time.time()) - 7200
    token = jwt.encode(_claims(credentials, iat=past, exp=past + 3600), _secret(credentials), algorithm="HS256")
    answer = requests.get(credentials.url(SUMMARY), headers=bearer(token))
    assert answer.status_code == 401
    assert "expired" in answer.json()["error"]
    assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]


def test_token_without_expiry_is_refused(credentials):
    claims = _claims(credentials)
    del claims["exp"]
    assert _summary_status(credentials, jwt.encode(claims, _secret(credentials), algorithm="HS256")) == 401


def test_refresh_token_is_not_an_access_token(credentials):
    credentials.store.create_user("refresh@example.com", PASSWORD)
    tokens = requests.post(credentials.url("/api/token/"), json={"email": "refresh@example.com", "password": PASSWORD})
    assert _summary_status(credentials, tokens.json()["refresh"]) == 401


def test_refresh_endpoint_issues_a_working_access_token(credentials):
    credentials.store.create_user("refresh2@example.com", PASSWORD)
    tokens = requests.post(credentials.url("/api/token/"), json={"email": "refresh2@example.com", "password": PASSWORD})
    answer = requests.post(credentials.url("/api/token/refresh/"), json={"refresh": tokens.json()["refresh"]})
    assert answer.status_code == 200
    assert _summary_status(credentials, answer.json()["access"]) == 200


def test_refresh_endpoint_refuses_an_access_token(credentials):
    access = credentials.user_token("refresh3@example.com")
    assert requests.post(credentials.url("/api/token/refresh/"), json={"refresh": access}).status_code == 401


def test_wrong_password_gets_401_and_an_audit_row_without_the_password(credentials):
    credentials.store.create_user("wrong@example.com", PASSWORD)
    answer = requests.post(credentials.url("/api/token/"), json={"email": "wrong@example.com", "password": "guess-123"})
    assert answer.status_code == 401
    row = credentials.store.audit_entries(limit=1)[0]
    assert (row.actor, row.action, row.outcome) == ("wrong@example.com", "POST /api/token/", "401")
    assert "guess-123" not in json.dumps(row.as_json())


def test_secret_file_is_created_with_0600_rights(credentials):
    mode = stat.S_IMODE((credentials.node.data_dir / SECRET_FILE).stat().st_mode)
    assert mode == 0o600


def test_tokens_stay_valid_across_a_restart(start_node, tmp_path):
    first = start_node(tmp_path / "data", auth={"required": True})
    token = Credentials(first).user_token("restart@example.com")
    first.stop()
    second = start_node(tmp_path / "data", auth={"required": True})
    assert _summary_status(Credentials(second), token) == 200


def test_passwords_keys_and_secrets_never_reach_the_logs(credentials, caplog):
    caplog.set_level(logging.DEBUG)
    token = credentials.user_token("logs@example.com")
    requests.post(credentials.url("/api/token/"), json={"email": "logs@example.com", "password": "not-the-password"})
    requests.post(credentials.url("/api/developer/profiles/"), headers=bearer(token),
                  json={"purpose": "testing", "organization": "x"})
    key = requests.post(credentials.url("/api-keys/"), headers=bearer(token), json={"name": "k"}).json()["key"]
    requests.get(credentials.url(SUMMARY), headers=bearer(key))
    client, secret = credentials.store.create_client("c", organization="local", scopes=("status",))
    requests.post(credentials.url("/oauth2/token"), auth=(client.client_id, secret),
                  data={"grant_type": "client_credentials"})
    for text in (PASSWORD, "not-the-password", token, key, secret):
        assert text not in caplog.text


# ------------------------------------------------------------------ OAuth2


@pytest.fixture
def client(credentials):
    return credentials.store.create_client("reporter", organization="local", scopes=("reports", "status"))


def test_oauth2_post_with_basic_credentials_issues_a_one_hour_bearer_token(credentials, client):
    record, secret = client
    answer = requests.post(credentials.url("/oauth2/token"), auth=(record.client_id, secret),
                           data={"grant_type": "client_credentials"})
    assert answer.status_code == 200
    body = answer.json()
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, "reports status")
    assert answer.headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600


def test_oauth2_post_with_form_credentials_and_narrower_scope(credentials, client):
    record, secret = client
    answer = requests.post(credentials.url("/oauth2/token"), data={
        "grant_type": "client_credentials", "client_id": record.client_id, "client_secret": secret, "scope": "status"})
    assert answer.status_code == 200
    assert answer.json()["scope"] == "status"


def test_oauth2_get_with_basic_credentials_as_seeds_001_002(credentials, client):
    record, secret = client
    answer = requests.get(credentials.url("/oauth2/token"), auth=(record.client_id, secret))
    assert answer.status_code == 200
    assert _summary_status(credentials, answer.json()["access_token"]) == 200


def test_oauth2_get_refuses_a_secret_in_the_query_string(credentials, client):
    record, secret = client
    answer = requests.get(credentials.url(f"/oauth2/token?client_id={record.client_id}&client_secret={secret}"))
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"


def test_oauth2_wrong_secret_is_invalid_client(credentials, client):
    record, _ = client
    answer = requests.post(credentials.url("/oauth2/token"), auth=(record.client_id, "wrong"),
                           data={"grant_type": "client_credentials"})
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"


def test_oauth2_scope_beyond_the_client_is_invalid_scope(credentials, client):
    record, secret = client
    answer = requests.post(credentials.url("/oauth2/token"), auth=(record.client_id, secret),
                           data={"grant_type": "client_credentials", "scope": "admin"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_scope"


def test_oauth2_other_grant_types_are_unsupported(credentials, client):
    record, secret = client
    answer = requests.post(credentials.url("/oauth2/token"), auth=(record.client_id, secret),
                           data={"grant_type": "password"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "unsupported_grant_type"


def test_client_token_outside_its_scopes_gets_403(credentials, client):
    record, secret = client
    token = requests.post(credentials.url("/oauth2/token"), auth=(record.client_id, secret),
                          data={"grant_type": "client_credentials"}).json()["access_token"]
    assert requests.get(credentials.url("/api/audit"), headers=bearer(token)).status_code == 403


def test_password_guessing_is_throttled_per_address_with_429(credentials):
    credentials.store.create_user("guessed@example.com", PASSWORD)
    guesses = [requests.post(credentials.url("/api/token/"), json={"email": "guessed@example.com",
                                                                   "password": f"guess-{n}"}).status_code
               for n in range(21)]
    assert guesses == [401] * 20 + [429]
    refused = requests.post(credentials.url("/api/token/"), json={"email": "guessed@example.com", "password": PASSWORD})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_configured_secret_signs_tokens_and_no_secret_file_is_made(start_node):
    secret = "a configured secret of at least thirty-two bytes"
    node = start_node(auth={"required": True, "secret": secret})
    user = node.archive.identity.create_user("configured@example.com", PASSWORD)
    now = int(time.time())
    token = jwt.encode({"iss": "dicomnode", "sub": f"user:{user.pk}", "typ": "access", "iat": now, "exp": now + 60},
                       secret, algorithm="HS256")
    assert requests.get(node.base_url + SUMMARY, headers=bearer(token)).status_code == 200
    assert not (node.data_dir / SECRET_FILE).exists()
