"""The access matrix over the routes that exist, and organization filtering in the
archive. Each family adds its own routes with tests.identity_helpers.check_access_matrix
(other_organization=True once its routes read organization-owned data)."""
from __future__ import annotations

import io

import pytest
import requests

from storage import NotFound, Query, Source
from tests import corpus
from tests.identity_helpers import Credentials, bearer, check_access_matrix


@pytest.fixture
def credentials(start_node) -> Credentials:
    return Credentials(start_node(auth={"required": True}))


def test_audit_route_matrix_401_401_401_403_200_each_audited(credentials):
    outcomes = check_access_matrix(credentials, "GET", "/api/audit", admin=True)
    assert outcomes == {"no credentials": 401, "bad token": 401, "expired token": 401, "wrong scope": 403,
                        "right credential": 200}


def test_activity_summary_matrix_401_401_401_200_each_audited(credentials):
    outcomes = check_access_matrix(credentials, "GET", "/api/developer/profiles/activity-summary/")
    assert outcomes == {"no credentials": 401, "bad token": 401, "expired token": 401, "right credential": 200}


def test_api_keys_listing_refuses_a_key_without_a_developer_account(credentials):
    answer = requests.get(credentials.url("/api-keys/"), headers=bearer(credentials.api_key()))
    assert answer.status_code == 403


def test_profile_creation_refuses_an_api_key(credentials):
    answer = requests.post(credentials.url("/api/developer/profiles/"), headers=bearer(credentials.api_key()),
                           json={"purpose": "testing", "organization": "x"})
    assert answer.status_code == 403


def test_api_key_creation_needs_a_developer_profile(credentials):
    token = credentials.user_token("noprofile@example.com")
    answer = requests.post(credentials.url("/api-keys/"), headers=bearer(token), json={"name": "k"})
    assert answer.status_code == 403
    assert "profile" in answer.json()["error"]


def test_deleting_another_developers_key_answers_404_and_keeps_it(credentials):
    store = credentials.store
    owner = store.create_user("owner@example.com", "password-owner")
    _, key = store.create_api_key("owned", organization="local", user_pk=owner.pk)
    record = store.check_api_key(key)
    intruder = credentials.user_token("intruder@example.com")
    answer = requests.delete(credentials.url(f"/api-keys/delete/{record.pk}/"), headers=bearer(intruder))
    assert answer.status_code == 404
    assert store.check_api_key(key) is not None


def test_healthz_stays_public_and_anonymous_calls_to_it_are_not_audited(credentials):
    before = credentials.audit_count()
    assert requests.get(credentials.url("/healthz")).status_code == 200
    assert credentials.audit_count() == before


def test_metrics_needs_an_admin_credential(credentials):
    assert requests.get(credentials.url("/metrics")).status_code == 401
    assert requests.get(credentials.url("/metrics"), headers=bearer(credentials.api_key())).status_code == 403
    admin = credentials.api_key(admin=True)
    assert requests.get(credentials.url("/metrics"), headers=bearer(admin)).status_code == 200


def test_unknown_route_without_credentials_is_401_and_audited(credentials):
    answer = requests.get(credentials.url("/dicomweb/studies"))
    assert answer.status_code == 401
    row = credentials.store.audit_entries(limit=1)[0]
    assert (row.action, row.outcome, row.actor_kind) == ("GET /dicomweb/studies", "401", "none")


def test_api_key_accepted_as_bearer_and_as_apikey_scheme(credentials):
    key = credentials.api_key()
    path = credentials.url("/api/developer/profiles/activity-summary/")
    assert requests.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert requests.get(path, headers={"Authorization": f"ApiKey {key}"}).status_code == 200


def test_audit_row_names_actor_organization_and_remote_address(credentials):
    key = credentials.api_key(organization="hospital-a", name="ward scanner")
    requests.get(credentials.url("/api/developer/profiles/activity-summary/?study_uid=1.2.3.4"), headers=bearer(key))
    row = credentials.store.audit_entries(limit=1)[0]
    assert (row.actor, row.actor_kind, row.organization, row.study_uid, row.outcome, row.remote) == (
        "ward scanner", "api_key", "hospital-a", "1.2.3.4", "200", "127.0.0.1")


def test_audit_route_shows_only_the_callers_organization(credentials):
    for organization in ("other", "local"):
        key = credentials.api_key(organization=organization)
        requests.get(credentials.url("/api/developer/profiles/activity-summary/"), headers=bearer(key))
    admin_key = credentials.api_key(organization="local", admin=True)
    entries = requests.get(credentials.url("/api/audit"), headers=bearer(admin_key)).json()["entries"]
    assert entries and {e["organization"] for e in entries} == {"local"}


def test_audit_route_filters_by_actor_and_study(credentials):
    key = credentials.api_key(name="filter me")
    requests.get(credentials.url("/api/developer/profiles/activity-summary/?study_uid=1.2.840.99"), headers=bearer(key))
    requests.get(credentials.url("/api/developer/profiles/activity-summary/"), headers=bearer(key))
    admin_key = credentials.api_key(admin=True)
    by_study = requests.get(credentials.url("/api/audit?study=1.2.840.99"), headers=bearer(admin_key)).json()
    assert [(e["actor"], e["study_uid"]) for e in by_study["entries"]] == [("filter me", "1.2.840.99")]
    by_actor = requests.get(credentials.url("/api/audit?actor=filter%20me&since=2000-01-01"),
                            headers=bearer(admin_key)).json()
    assert len(by_actor["entries"]) == 2


def test_audit_route_refuses_a_bad_time_filter_with_400(credentials):
    admin_key = credentials.api_key(admin=True)
    answer = requests.get(credentials.url("/api/audit?since=yesterday"), headers=bearer(admin_key))
    assert answer.status_code == 400


# ------------------------------------------------------------------ archive organizations


def _store_study(archive, organization: str) -> str:
    ds = corpus.ct_series(1)[0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return archive.store_bytes(buffer.getvalue(), Source("http", "test", organization=organization)).study_uid


def test_archive_hides_another_organizations_study(tmp_path):
    from storage import Archive

    archive = Archive(tmp_path / "archive")
    try:
        study_uid = _store_study(archive, "hospital-a")
        query = Query("STUDY", {"StudyInstanceUID": study_uid}, organizations=("hospital-b",))
        assert list(archive.find(query)) == []
        assert archive.instances(study_uid, organizations=("hospital-b",)) == []
        with pytest.raises(NotFound):
            archive.delete(study_uid, organizations=("hospital-b",))
        own = Query("STUDY", {"StudyInstanceUID": study_uid}, organizations=("hospital-a",))
        assert [m["StudyInstanceUID"] for m in archive.find(own)] == [study_uid]
    finally:
        archive.close()


def test_with_auth_off_a_delete_is_still_audited(start_node):
    node = start_node(auth={"required": False})
    answer = requests.delete(node.base_url + "/api-keys/delete/1/")
    assert answer.status_code == 403  # anonymous is no developer account
    row = node.archive.identity.audit_entries(limit=1)[0]
    assert (row.action, row.actor_kind, row.outcome) == ("DELETE /api-keys/delete/1/", "anonymous", "403")
