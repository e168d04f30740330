"""dicomnode user / client / key / audit against a real node's archive folder."""
from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import run_cli
from tests.identity_helpers import PASSWORD, bearer

SUMMARY = "/api/developer/profiles/activity-summary/"


@pytest.mark.parametrize("command", [("user", "add"), ("client", "add"), ("key", "add"), ("key", "list"),
                                     ("key", "delete"), ("audit",)])
def test_identity_commands_have_help(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0 and "usage: dicomnode" in proc.stdout


def test_user_add_creates_an_account_that_gets_tokens(start_node, tmp_path):
    data = tmp_path / "data"
    proc = run_cli("user", "add", "cli@example.com", "--password", PASSWORD, "--org", "ward-7", "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    node = start_node(data, auth={"required": True})
    answer = requests.post(node.base_url + "/api/token/", json={"email": "cli@example.com", "password": PASSWORD})
    assert answer.status_code == 200
    assert node.archive.identity.check_password("cli@example.com", PASSWORD).organization == "ward-7"


def test_user_add_twice_exits_1(tmp_path):
    args = ("user", "add", "twice@example.com", "--password", PASSWORD, "--data", str(tmp_path))
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode == 1 and "exists already" in again.stderr


def test_user_add_with_a_short_password_exits_2(tmp_path):
    proc = run_cli("user", "add", "short@example.com", "--password", "short", "--data", str(tmp_path))
    assert proc.returncode == 2


def test_key_add_prints_a_working_key_once_and_bad_plan_exits_2(start_node, tmp_path):
    data = tmp_path / "data"
    proc = run_cli("key", "add", "modality", "--org", "ward-7", "--plan", "professional", "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert run_cli("key", "add", "x", "--org", "o", "--plan", "gold", "--data", str(data)).returncode == 2
    listing = run_cli("key", "list", "--data", str(data))
    assert "modality" in listing.stdout and key not in listing.stdout
    node = start_node(data, auth={"required": True})
    assert requests.get(node.base_url + SUMMARY, headers=bearer(key)).status_code == 200


def test_key_delete_stops_the_key_at_once_on_a_serving_node(start_node, tmp_path):
    node = start_node(tmp_path / "data", auth={"required": True})
    record, key = node.archive.identity.create_api_key("doomed", organization="local")
    assert requests.get(node.base_url + SUMMARY, headers=bearer(key)).status_code == 200
    proc = run_cli("key", "delete", str(record.pk), "--data", str(node.data_dir))
    assert proc.returncode == 0, proc.stderr
    assert requests.get(node.base_url + SUMMARY, headers=bearer(key)).status_code == 401


def test_client_add_prints_credentials_that_get_an_oauth2_token(start_node, tmp_path):
    data = tmp_path / "data"
    proc = run_cli("client", "add", "reporting", "--org", "ward-7", "--scopes", "reports status", "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    node = start_node(data, auth={"required": True})
    answer = requests.post(node.base_url + "/oauth2/token", auth=(printed["client_id"], printed["client_secret"]),
                           data={"grant_type": "client_credentials"})
    assert answer.status_code == 200 and answer.json()["scope"] == "reports status"


def test_client_add_with_an_unknown_scope_exits_2(tmp_path):
    proc = run_cli("client", "add", "c", "--org", "o", "--scopes", "everything", "--data", str(tmp_path))
    assert proc.returncode == 2 and "unknown scope" in proc.stderr


def test_audit_lists_http_rows_filtered_by_actor(start_node, tmp_path):
    node = start_node(tmp_path / "data", auth={"required": True})
    _, key = node.archive.identity.create_api_key("audited key", organization="local")
    requests.get(node.base_url + SUMMARY + "?study_uid=1.2.3", headers=bearer(key))
    proc = run_cli("audit", "--actor", "audited key", "--json", "--data", str(node.data_dir))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["action"], r["outcome"], r["study_uid"]) for r in rows] == [(f"GET {SUMMARY}", "200", "1.2.3")]


def test_audit_with_a_bad_time_exits_2(tmp_path):
    assert run_cli("audit", "--since", "last tuesday", "--data", str(tmp_path)).returncode == 2
