"""Per-plan rate limits, the monthly quota helper, and usage counters across restarts."""
from __future__ import annotations

import pytest
import requests
from aiohttp import web

from cli.runtime import open_archive
from dicomweb import create_app
from dicomweb.auth import requires
from dicomweb.limits import MONTHLY_QUOTA, RateLimiter, monthly_quota, seconds_to_next_month
from tests.conftest import make_settings
from tests.identity_helpers import Credentials, bearer

SUMMARY = "/api/developer/profiles/activity-summary/"
METERED = "/api/dicom/read/file/"


def test_developer_plan_gets_429_with_retry_after_past_60_calls_a_minute(start_node):
    credentials = Credentials(start_node(auth={"required": True}))
    key = credentials.api_key(plan="developer")
    statuses = [requests.get(credentials.url(SUMMARY), headers=bearer(key)).status_code for _ in range(60)]
    assert statuses == [200] * 60
    refused = requests.get(credentials.url(SUMMARY), headers=bearer(key))
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert credentials.store.audit_entries(limit=1)[0].outcome == "429"


def test_rate_limit_is_counted_per_credential():
    limiter = RateLimiter(clock=lambda: 100.0)
    assert [limiter.retry_after("key:1", 2) for _ in range(3)] == [None, None, 60]
    assert limiter.retry_after("key:2", 2) is None


def test_enterprise_plan_is_not_rate_limited(start_node):
    credentials = Credentials(start_node(auth={"required": True}))
    key = credentials.api_key(plan="enterprise")
    statuses = {requests.get(credentials.url(SUMMARY), headers=bearer(key)).status_code for _ in range(61)}
    assert statuses == {200}


def test_sliding_window_frees_a_call_once_the_oldest_is_a_minute_old():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.retry_after("key:1", 1) is None
    now[0] = 59.5
    assert limiter.retry_after("key:1", 1) == 1
    now[0] = 60.0
    assert limiter.retry_after("key:1", 1) is None


def test_seconds_to_next_month_crosses_the_year():
    from datetime import datetime, timezone

    december_31 = datetime(2026, 12, 31, 23, 59, 0, tzinfo=timezone.utc).timestamp()
    assert seconds_to_next_month(december_31) == 60


# ------------------------------------------------------------------ the quota helper on a metered route

metered_routes = web.RouteTableDef()


@metered_routes.post(METERED)
@requires("upload")
@monthly_quota()
async def metered_probe(request: web.Request) -> web.Response:
    """Stands in for the DICOM format family's route, which meters itself the same way."""
    return web.json_response({"ok": True})


@pytest.fixture
async def metered_app(tmp_path, aiohttp_client):
    settings = make_settings(tmp_path / "data", auth={"required": True})
    archive = open_archive(settings)
    app = create_app(settings, archive)
    app.add_routes(metered_routes)
    client = await aiohttp_client(app)
    yield client, archive
    await client.close()
    archive.close()


async def test_quota_allows_the_1000th_call_of_the_month(metered_app):
    client, archive = metered_app
    record, key = archive.identity.create_api_key("dev", organization="local")
    archive.identity.count_usage(f"key:{record.pk}", METERED, calls=MONTHLY_QUOTA - 1)
    answer = await client.post(METERED, headers=bearer(key))
    assert answer.status == 200


async def test_quota_refuses_the_1001st_call_with_the_seed_003_body(metered_app):
    client, archive = metered_app
    record, key = archive.identity.create_api_key("dev", organization="local")
    archive.identity.count_usage(f"key:{record.pk}", METERED, calls=MONTHLY_QUOTA)
    answer = await client.post(METERED, headers=bearer(key))
    assert answer.status == 429
    assert await answer.json() == {"error": "Monthly API request for '/api/dicom/read/file/' limit exceeded.",
                                   "quota": 1000, "requests_used": 1001}
    assert int(answer.headers["Retry-After"]) >= 1


async def test_quota_counts_per_developer_across_their_keys(metered_app):
    client, archive = metered_app
    developer = archive.identity.create_user("dev@example.com", "password-dev")
    _, first = archive.identity.create_api_key("one", organization="local", user_pk=developer.pk)
    _, second = archive.identity.create_api_key("two", organization="local", user_pk=developer.pk)
    archive.identity.count_usage(f"user:{developer.pk}", METERED, calls=MONTHLY_QUOTA - 1)
    assert (await client.post(METERED, headers=bearer(first))).status == 200
    assert (await client.post(METERED, headers=bearer(second))).status == 429


async def test_other_routes_do_not_use_up_the_quota(metered_app):
    client, archive = metered_app
    record, key = archive.identity.create_api_key("dev", organization="local")
    archive.identity.count_usage(f"key:{record.pk}", SUMMARY, calls=MONTHLY_QUOTA * 2)
    assert (await client.post(METERED, headers=bearer(key))).status == 200


def test_usage_counters_survive_a_restart(start_node, tmp_path):
    first = start_node(tmp_path / "data", auth={"required": True})
    key = Credentials(first).api_key()
    for _ in range(3):
        requests.get(first.base_url + SUMMARY, headers=bearer(key))
    first.stop()
    second = start_node(tmp_path / "data", auth={"required": True})
    summary = requests.get(second.base_url + SUMMARY, headers=bearer(key)).json()
    assert summary["monthly_total"] == 3


def test_rate_limiter_forgets_idle_credentials():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for n in range(RateLimiter.SWEEP_EVERY - 1):
        limiter.retry_after(f"address:{n}", 20)
    now[0] = 61.0
    limiter.retry_after("address:last", 20)
    assert limiter.tracked() == 1
