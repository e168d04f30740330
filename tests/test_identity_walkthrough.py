"""Seed 003's API key flow, end to end against a real node."""
from __future__ import annotations

from datetime import datetime, timezone

import requests

from tests.identity_helpers import PASSWORD, bearer


def test_seed_003_walkthrough_token_profile_key_use_summary_delete_refused(start_node):
    node = start_node(auth={"required": True})
    node.archive.identity.create_user("user5@example.com", PASSWORD, organization="hospital-a")
    url = node.base_url

    tokens = requests.post(f"{url}/api/token/", json={"email": "user5@example.com", "password": PASSWORD})
    assert tokens.status_code == 200
    assert set(tokens.json()) == {"access", "refresh"}
    access = bearer(tokens.json()["access"])

    profile = requests.post(f"{url}/api/developer/profiles/", headers=access,
                            json={"purpose": "testing", "organization": "My Organization"})
    assert profile.status_code == 201
    assert profile.json() == {"purpose": "testing", "organization": "My Organization"}

    created = requests.post(f"{url}/api-keys/", headers=access, json={"name": "New API Key"})
    assert created.status_code == 201
    assert set(created.json()) == {"id", "name", "key"} and created.json()["name"] == "New API Key"
    key, key_id = created.json()["key"], created.json()["id"]

    listed = requests.get(f"{url}/api-keys/", headers={"Authorization": f"ApiKey {key}"})
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()] == [key_id]
    assert key not in listed.text

    summary = requests.get(f"{url}/api/developer/profiles/activity-summary/", headers=access)
    assert summary.status_code == 200
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    # the calls before this one: profile, key, the key's listing
    assert summary.json() == {"daily_activity": [{"day": today, "count": 3}], "monthly_total": 3}

    deleted = requests.delete(f"{url}/api-keys/delete/{key_id}/", headers=access)
    assert deleted.status_code == 204

    refused = requests.get(f"{url}/api-keys/", headers={"Authorization": f"ApiKey {key}"})
    assert refused.status_code == 401
