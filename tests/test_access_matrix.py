"""The access matrix of issue 4 over every protected HTTP family, with real credentials.

One node with ``[auth] required = true`` serves the whole module. Every family's
representative routes are called with: no credentials, a bad token (a JWT signed with
another secret, or a real API key's prefix with a wrong secret), an expired token, another
organization's credential, a credential with the wrong scope (or role) and the right
credential, which must answer 401 / 401 / 401 / 404 / 403 / success. Reads of
organization-owned data by another organization answer 404 as if the data did not exist;
searches simply do not list it. STOW-RS into another organization's existing study cannot
pretend the study does not exist (its UID is taken): it is refused with 409 and leaves the
study as it was. Every request leaves exactly one audit row.

The right credential rotates between the three real kinds (OAuth2 client token, user
JWT from ``POST /api/token/``, API key) so that each family is exercised with more than
one of them. Routes that change data get a fresh target per case (``prepare``), so that
the cases are independent of their order.

Each request is followed by ``GET /healthz`` on the same keep-alive connection: aiohttp
handles one request of a connection at a time, so its answer means the previous request
has been handled to the end, its audit row (written after a streamed body) included.
"""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jwt
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomweb.tokens import ACCESS, ISSUER, signer_for
from storage import Source
from tests import corpus
from tests.conftest import NodeThread, make_settings
from tests.dicomweb_http import encoded, multipart_body
from tests.identity_helpers import PASSWORD
from tests.worklist_helpers import seed_entry, ups_dataset

LOCAL, OTHER = "local", "elsewhere"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTETS = 'multipart/related; type="application/octet-stream"'
DICOM_JSON = {"Content-Type": "application/dicom+json"}
CASES = ("no_credentials", "bad_token", "expired_token", "other_organization", "wrong_scope", "right_credential")
CASE_STATUS = {"no_credentials": 401, "bad_token": 401, "expired_token": 401, "other_organization": 404,
               "wrong_scope": 403}


# --------------------------------------------------------------------------- the node and its data


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class World:
    node: NodeThread
    tokens: dict[str, str] = field(default_factory=dict)  # credential name -> Authorization value
    ctx: dict[str, Any] = field(default_factory=dict)  # UIDs and ids the route templates use

    @property
    def archive(self):
        return self.node.archive

    @property
    def store(self):
        return self.node.archive.identity

    def call(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> Answer:
        """One request, then a barrier on the same connection (see the module docstring)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.node.http_port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
            assert not response.will_close, "the barrier needs the connection kept alive"
            conn.request("GET", "/healthz")
            barrier = conn.getresponse()
            barrier.read()
            assert barrier.status == 200
        finally:
            conn.close()
        return answer

    def store_study(self, organization: str, **kwargs: Any) -> Dataset:
        ds = corpus.ct_series(1, size=8, **kwargs)[0]
        self.archive.store_bytes(encoded(ds), Source("test", organization=organization))
        return ds

    def workitem(self, organization: str, patient_id: str = "MATRIX-UPS") -> str:
        uid = generate_uid()
        self.archive.workitems.create(ups_dataset(PatientID=patient_id), organization, uid=uid)
        return uid

    def seed_workitem(self, organization: str, patient_id: str = "MATRIX-WL") -> str:
        from storage.workitem_model import worklist_entry

        item = self.archive.workitems.create(worklist_entry(seed_entry(PatientID=patient_id)), organization,
                                             unique_study=True)
        return item.study_uid


def _user_token(node: NodeThread, email: str, organization: str, admin: bool = False) -> tuple[str, int]:
    user = node.archive.identity.create_user(email, PASSWORD, organization=organization, admin=admin)
    answer = requests.post(node.base_url + "/api/token/", json={"email": email, "password": PASSWORD}, timeout=30)
    answer.raise_for_status()
    return answer.json()["access"], user.pk


def _client_token(node: NodeThread, scopes: tuple[str, ...], organization: str) -> str:
    client, secret = node.archive.identity.create_client(f"matrix {' '.join(scopes)}", organization=organization,
                                                         scopes=scopes)
    answer = requests.post(node.base_url + "/oauth2/token", auth=(client.client_id, secret),
                           data={"grant_type": "client_credentials"}, timeout=30)
    answer.raise_for_status()
    return answer.json()["access_token"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    node = NodeThread(make_settings(tmp_path_factory.mktemp("matrix"), auth={"required": True})).start()
    try:
        w = World(node)
        store, signer = w.store, signer_for(node.settings)
        bearer = lambda credential: f"Bearer {credential}"  # noqa: E731
        # OAuth2 client tokens, user JWTs (six calls to the token endpoints: under their throttle)
        w.tokens["client_read"] = bearer(_client_token(node, ("dicomweb.read",), LOCAL))
        w.tokens["client_worklist"] = bearer(_client_token(node, ("worklist",), LOCAL))
        w.tokens["other_client_read"] = bearer(_client_token(node, ("dicomweb.read",), OTHER))
        user, user_pk = _user_token(node, "reader@matrix.example", LOCAL)
        w.tokens["user"] = bearer(user)
        w.tokens["admin_user"] = bearer(_user_token(node, "admin@matrix.example", LOCAL, admin=True)[0])
        other_user, other_pk = _user_token(node, "stranger@matrix.example", OTHER)
        w.tokens["other_user"] = bearer(other_user)
        w.ctx.update(user_pk=user_pk, other_user_pk=other_pk)
        # API keys, "Bearer" and "ApiKey" schemes both
        for name, organization, scopes, admin, scheme in (
            ("key_read", LOCAL, ("dicomweb.read",), False, "ApiKey"),
            ("key_write", LOCAL, ("dicomweb.write",), False, "Bearer"),
            ("key_worklist", LOCAL, ("worklist",), False, "ApiKey"),
            ("key_admin", LOCAL, (), True, "Bearer"),
            ("other_key_read", OTHER, ("dicomweb.read",), False, "Bearer"),
            ("other_key_write", OTHER, ("dicomweb.write",), False, "ApiKey"),
            ("other_key_worklist", OTHER, ("worklist",), False, "Bearer"),
            ("other_key_admin", OTHER, (), True, "Bearer"),
        ):
            key = store.create_api_key(name, organization=organization, plan="enterprise", admin=admin,
                                       scopes=scopes)[1]
            w.tokens[name] = f"{scheme} {key}"
        # expired tokens, signed with the node's own secret two hours ago
        for name, scopes in (("expired_read", ("dicomweb.read",)), ("expired_write", ("dicomweb.write",)),
                             ("expired_worklist", ("worklist",)), ("expired_admin", ("admin",))):
            client, _ = store.create_client(name, organization=LOCAL, scopes=scopes)
            w.tokens[name] = bearer(signer.issue(f"client:{client.client_id}", ACCESS, 3600, scopes=scopes,
                                                 now=time.time() - 7200))
        w.tokens["expired_user"] = bearer(signer.issue(f"user:{user_pk}", ACCESS, 900, now=time.time() - 7200))
        # a well-formed token for a real account, signed with a secret that is not the node's
        forged = {"iss": ISSUER, "sub": f"user:{user_pk}", "typ": ACCESS, "iat": int(time.time()),
                  "exp": int(time.time()) + 600, "scope": "dicomweb.read dicomweb.write worklist admin"}
        w.tokens["forged"] = bearer(jwt.encode(forged, "not the secret of this node, 32 bytes", algorithm="HS256"))
        # a real key's lookup prefix with a wrong secret part
        real = w.tokens["key_admin"].split(" ", 1)[1]
        w.tokens["tampered_key"] = f"ApiKey {real[:-4]}{'AAAA' if real[-4:] != 'AAAA' else 'BBBB'}"
        # organization-owned data: one study each, workitems each
        mine = w.store_study(LOCAL, patient=corpus.Patient("MATRIX-MINE", "MINE^LOCAL"), accession="MINE")
        theirs = w.store_study(OTHER, patient=corpus.Patient("MATRIX-THEIRS", "THEIRS^OTHER"), accession="THEIRS")
        w.ctx.update(study=mine.StudyInstanceUID, series=mine.SeriesInstanceUID, instance=mine.SOPInstanceUID,
                     their_study=theirs.StudyInstanceUID, their_instance=theirs.SOPInstanceUID,
                     ups=w.workitem(LOCAL), their_ups=w.workitem(OTHER))
        w.seed_workitem(LOCAL)
        yield w
    finally:
        node.stop()


# --------------------------------------------------------------------------- routes


def _fresh_study(w: World) -> dict[str, Any]:
    ds = w.store_study(LOCAL)
    return {"target": ds.StudyInstanceUID, "target_series": ds.SeriesInstanceUID,
            "target_instance": ds.SOPInstanceUID, "target_ds": ds}


def _fresh_ups(w: World) -> dict[str, Any]:
    return {"target": w.workitem(LOCAL)}


def _fresh_seed_workitem(w: World) -> dict[str, Any]:
    return {"target": w.seed_workitem(LOCAL)}


def _fresh_key(w: World) -> dict[str, Any]:
    record, key = w.store.create_api_key("developer key", organization=LOCAL, user_pk=w.ctx["user_pk"])
    return {"target": record.pk, "target_key": key}


def _ups_json(**changes: Any) -> bytes:
    return json.dumps([ups_dataset(**changes).to_json_dict()]).encode()


def _state_body(_: World, ctx: dict[str, Any]) -> bytes:
    body = Dataset()
    body.ProcedureStepState = "IN PROGRESS"
    body.TransactionUID = generate_uid()
    return json.dumps(body.to_json_dict()).encode()


def _stow_new(_: World, ctx: dict[str, Any]) -> tuple[bytes, str]:
    return multipart_body([encoded(corpus.ct_series(1, size=8)[0])])


def _stow_into_target(_: World, ctx: dict[str, Any]) -> tuple[bytes, str]:
    """The target study's own instance, changed: what an intruder would overwrite it with."""
    ds = ctx["target_ds"].copy()
    ds.PatientName = "INTRUDER^WAS^HERE"
    return multipart_body([encoded(ds)])


def _uids(answer: Answer) -> set[str]:
    """Every UI value in a DICOM JSON answer (empty for 204)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("vr") == "UI":
                found.update(str(v) for v in node.get("Value", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(answer.json() if answer.status != 204 else [])
    return found


@dataclass(frozen=True)
class Route:
    id: str
    method: str
    path: str  # formatted with World.ctx and what prepare returns
    right: str  # credential names of World.tokens
    expired: str
    wrong: str | None  # None: the route needs no scope, so there is no wrong-scope case
    other: str | None  # None: the route touches no organization-owned data
    success: int = 200
    hidden: bool = False  # a search: another organization gets `success` and does not see our data
    other_status: int = 404  # what another organization's credential gets (when not hidden)
    headers: dict[str, str] = field(default_factory=dict)
    body: Callable[[World, dict[str, Any]], Any] | None = None  # bytes, or (bytes, content type)
    prepare: Callable[[World], dict[str, Any]] | None = None
    check: Callable[[World, dict[str, Any], str, Answer], None] | None = None  # after the request
    study_in_audit: bool = False  # the audit row names the study {study} or {target}


def _check_search(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    uids = _uids(answer)
    if case == "other_organization":
        assert not uids & {w.ctx["study"], w.ctx["instance"], w.ctx["ups"]}, \
            "another organization's search lists our data"
    if case == "right_credential":
        assert not uids & {w.ctx["their_study"], w.ctx["their_instance"], w.ctx["their_ups"]}, \
            "our search lists another organization's data"


def _check_study_kept(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    kept = w.archive.instances(ctx["target"])
    assert bool(kept) == (case != "right_credential"), case


def _check_stow_new(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    if case == "right_credential":
        [stored] = answer.json()["00081199"]["Value"]
        study = stored["00081190"]["Value"][0].split("/studies/")[1].split("/")[0]
        assert w.archive.instances(study, organizations=(LOCAL,))


def _check_target_unchanged(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    import pydicom

    [item] = w.archive.instances(ctx["target"], organizations=(LOCAL,))
    with w.archive.open_instance(item) as fh:
        name = str(pydicom.dcmread(fh, stop_before_pixels=True).PatientName)
    assert (name == "INTRUDER^WAS^HERE") == (case == "right_credential"), (case, name)


def _check_ups_state(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    state = w.archive.workitems.get(ctx["target"]).state
    assert state == ("IN PROGRESS" if case == "right_credential" else "SCHEDULED"), (case, state)


def _label_json(label: str) -> bytes:
    changes = Dataset()
    changes.ProcedureStepLabel = label
    return json.dumps(changes.to_json_dict()).encode()


def _check_ups_label(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    label = str(w.archive.workitems.get(ctx["target"]).dataset.ProcedureStepLabel)
    assert label == ("CHANGED" if case == "right_credential" else "CT head"), (case, label)


def _check_ups_cancel(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    state = w.archive.workitems.get(ctx["target"]).state  # a SCHEDULED workitem is canceled at once
    assert state == ("CANCELED" if case == "right_credential" else "SCHEDULED"), (case, state)


def _check_seed_workitem_kept(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    kept = list(w.archive.workitems.find({"StudyInstanceUID": ctx["target"]}))
    assert bool(kept) == (case != "right_credential"), case


def _check_ups_subscribed(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    subscribers = w.archive.workitems.subscribers(ctx["target"], LOCAL)
    assert ("MATRIXSUB" in subscribers) == (case == "right_credential"), (case, subscribers)


def _subscribed_ups(w: World) -> dict[str, Any]:
    uid = w.workitem(LOCAL)
    w.archive.workitems.subscribe("MATRIXSUB", uid, LOCAL)
    return {"target": uid}


def _check_ups_unsubscribed(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    subscribers = w.archive.workitems.subscribers(ctx["target"], LOCAL)
    assert ("MATRIXSUB" in subscribers) == (case != "right_credential"), (case, subscribers)


def _check_key_kept(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    assert (w.store.check_api_key(ctx["target_key"]) is None) == (case == "right_credential"), case


def _check_key_listing(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    if case == "other_organization":
        assert "developer key" not in {k["name"] for k in answer.json()}, \
            "another organization's developer lists our keys"
    if case == "right_credential":
        assert ctx["target"] in {k["id"] for k in answer.json()}


def _check_audit_listing(w: World, ctx: dict[str, Any], case: str, answer: Answer) -> None:
    if case not in ("other_organization", "right_credential"):
        return
    organizations = {e["organization"] for e in answer.json()["entries"]}
    if case == "other_organization":
        assert LOCAL not in organizations, "another organization's admin reads our audit rows"
    if case == "right_credential":
        assert organizations == {LOCAL}


INSTANCE = "/dicomweb/studies/{study}/series/{series}/instances/{instance}"
READ = dict(expired="expired_read", wrong="client_worklist")
WRITE = dict(expired="expired_write", wrong="client_read")
WORKLIST = dict(expired="expired_worklist", wrong="client_read")
ADMIN = dict(expired="expired_admin", wrong="user")

ROUTES = (
    # QIDO-RS: another organization's search does not list our data
    Route("qido_studies", "GET", "/dicomweb/studies?PatientID=MATRIX-*", right="client_read",
          other="other_client_read", hidden=True, check=_check_search, **READ),
    Route("qido_study_series", "GET", "/dicomweb/studies/{study}/series", right="user", other="other_key_read",
          hidden=True, check=_check_search, study_in_audit=True, **READ),
    Route("qido_study_instances", "GET", "/dicomweb/studies/{study}/instances", right="key_read",
          other="other_key_read", hidden=True, check=_check_search, study_in_audit=True, **READ),
    Route("qido_series_instances", "GET", "/dicomweb/studies/{study}/series/{series}/instances", right="client_read",
          other="other_client_read", hidden=True, check=_check_search, study_in_audit=True, **READ),
    Route("qido_all_series", "GET", "/dicomweb/series?PatientID=MATRIX-*", right="key_read",
          other="other_key_read", hidden=True, check=_check_search, **READ),
    Route("qido_all_instances", "GET", "/dicomweb/instances?PatientID=MATRIX-*", right="user",
          other="other_user", hidden=True, check=_check_search, **READ),
    # WADO-RS: another organization's study answers 404
    Route("wado_study", "GET", "/dicomweb/studies/{study}", right="user", other="other_key_read",
          headers={"Accept": DICOM_ANY}, study_in_audit=True, **READ),
    Route("wado_instance", "GET", INSTANCE, right="client_read", other="other_client_read",
          headers={"Accept": DICOM_ANY}, study_in_audit=True, **READ),
    Route("wado_metadata", "GET", "/dicomweb/studies/{study}/metadata", right="key_read", other="other_user",
          study_in_audit=True, **READ),
    Route("wado_frames", "GET", INSTANCE + "/frames/1", right="client_read", other="other_key_read",
          headers={"Accept": OCTETS}, study_in_audit=True, **READ),
    Route("wado_rendered", "GET", INSTANCE + "/rendered", right="user", other="other_client_read",
          headers={"Accept": "image/png"}, study_in_audit=True, **READ),
    Route("wado_thumbnail", "GET", "/dicomweb/studies/{study}/thumbnail", right="key_read", other="other_key_read",
          headers={"Accept": "image/jpeg"}, study_in_audit=True, **READ),
    Route("wado_bulkdata", "GET", INSTANCE + "/bulkdata/7FE00010", right="key_read", other="other_user",
          headers={"Accept": OCTETS}, study_in_audit=True, **READ),
    # WADO-URI
    Route("wado_uri", "GET", "/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
          "&objectUID={instance}&contentType=application/dicom", right="key_read", other="other_key_read",
          study_in_audit=True, **READ),
    # STOW-RS: a new study for the caller's organization; into an existing study of another
    # organization it is refused and the study is left as it was
    Route("stow_new_study", "POST", "/dicomweb/studies", right="key_write", other=None, body=_stow_new,
          check=_check_stow_new, **WRITE),
    Route("stow_into_study", "POST", "/dicomweb/studies/{target}", right="user", other="other_key_write",
          other_status=409, body=_stow_into_target, prepare=_fresh_study, check=_check_target_unchanged,
          study_in_audit=True,
          **WRITE),
    # DELETE (admin)
    Route("delete_study", "DELETE", "/dicomweb/studies/{target}", right="key_admin", other="other_key_admin",
          success=204, prepare=_fresh_study, check=_check_study_kept, study_in_audit=True, **ADMIN),
    Route("delete_instance", "DELETE",
          "/dicomweb/studies/{target}/series/{target_series}/instances/{target_instance}", right="admin_user",
          other="other_key_admin", success=204, prepare=_fresh_study, check=_check_study_kept,
          study_in_audit=True, **ADMIN),
    # seed 004 worklist
    Route("worklist_list", "GET", "/workitems?patientID=MATRIX-WL", right="client_worklist",
          other="other_key_worklist", hidden=True, check=_check_search, **WORKLIST),
    Route("worklist_create", "POST", "/workitems", right="key_worklist", other=None,
          headers={"Content-Type": "application/json"},
          body=lambda w, ctx: json.dumps(seed_entry(PatientID="MATRIX-NEW")).encode(), **WORKLIST),
    Route("worklist_delete", "DELETE", "/workitems/{target}", right="user", other="other_key_worklist",
          success=204, prepare=_fresh_seed_workitem, check=_check_seed_workitem_kept, study_in_audit=True,
          **WORKLIST),
    # UPS-RS
    Route("ups_search", "GET", "/dicomweb/workitems?PatientID=MATRIX-UPS", right="client_worklist",
          other="other_key_worklist", hidden=True, check=_check_search, **WORKLIST),
    Route("ups_retrieve", "GET", "/dicomweb/workitems/{ups}", right="key_worklist", other="other_key_worklist",
          **WORKLIST),
    Route("ups_create", "POST", "/dicomweb/workitems", right="user", other=None, success=201,
          headers=DICOM_JSON, body=lambda w, ctx: _ups_json(PatientID="MATRIX-UPS-NEW"), **WORKLIST),
    Route("ups_update", "POST", "/dicomweb/workitems/{target}", right="client_worklist",
          other="other_key_worklist", headers=DICOM_JSON, body=lambda w, ctx: _label_json("CHANGED"),
          prepare=_fresh_ups, check=_check_ups_label, **WORKLIST),
    Route("ups_change_state", "PUT", "/dicomweb/workitems/{target}/state", right="key_worklist",
          other="other_key_worklist", headers=DICOM_JSON, body=_state_body, prepare=_fresh_ups,
          check=_check_ups_state, **WORKLIST),
    Route("ups_cancel_request", "POST", "/dicomweb/workitems/{target}/cancelrequest", right="client_worklist",
          other="other_key_worklist", success=202, prepare=_fresh_ups, check=_check_ups_cancel, **WORKLIST),
    Route("ups_subscribe", "POST", "/dicomweb/workitems/{target}/subscribers/MATRIXSUB", right="user",
          other="other_key_worklist", success=201, prepare=_fresh_ups, check=_check_ups_subscribed, **WORKLIST),
    Route("ups_unsubscribe", "DELETE", "/dicomweb/workitems/{target}/subscribers/MATRIXSUB", right="key_worklist",
          other="other_key_worklist", prepare=_subscribed_ups, check=_check_ups_unsubscribed, **WORKLIST),
    # identity: a developer's keys (needs an account: an API key is the wrong credential), the audit log
    Route("api_keys_list", "GET", "/api-keys/", right="user", other="other_user", hidden=True,
          expired="expired_user", wrong="key_read", prepare=_fresh_key, check=_check_key_listing),
    Route("api_keys_delete", "DELETE", "/api-keys/delete/{target}/", right="user", other="other_user", success=204,
          expired="expired_user", wrong="key_read", prepare=_fresh_key, check=_check_key_kept),
    Route("audit_log", "GET", "/api/audit?limit=1000", right="key_admin", other="other_key_admin", hidden=True,
          check=_check_audit_listing, **ADMIN),
    # /metrics: an admin credential, like any other protected route
    Route("metrics", "GET", "/metrics", right="admin_user", other=None, **ADMIN),
)

def _matrix() -> list[Any]:
    params = []
    for route in ROUTES:
        for case in CASES:
            if case == "other_organization" and route.other is None:
                continue
            if case == "wrong_scope" and route.wrong is None:
                continue
            params.append(pytest.param(route, case, id=f"{route.id}-{case}"))
    return params


def _credential(route: Route, case: str) -> str | None:
    bad = "forged" if ROUTES.index(route) % 2 == 0 else "tampered_key"  # a bad JWT, or a bad API key
    return {"no_credentials": None, "bad_token": bad, "expired_token": route.expired,
            "other_organization": route.other, "wrong_scope": route.wrong, "right_credential": route.right}[case]


def _kind(credential: str) -> str:
    """The kind of principal a credential of World.tokens is."""
    return "client" if "client" in credential else "user" if credential.endswith("user") else "api_key"


def _expected_status(route: Route, case: str) -> int:
    if case == "right_credential" or (case == "other_organization" and route.hidden):
        return route.success
    if case == "other_organization":
        return route.other_status
    return CASE_STATUS[case]


@pytest.mark.parametrize("route, case", _matrix())
def test_access_matrix(world: World, route: Route, case: str) -> None:
    ctx = {**world.ctx, **(route.prepare(world) if route.prepare else {})}
    path = route.path.format(**ctx)
    headers = dict(route.headers)
    credential = _credential(route, case)
    if credential is not None:
        headers["Authorization"] = world.tokens[credential]
    body = route.body(world, ctx) if route.body else None
    if isinstance(body, tuple):
        body, headers["Content-Type"] = body
    before = world.store.audit_entries(limit=1)
    last_pk = before[0].pk if before else 0

    answer = world.call(route.method, path, headers, body)

    expected = _expected_status(route, case)
    if route.hidden and case == "other_organization" and answer.status == 204:
        expected = 204  # an empty search may answer 204 No Content
    assert answer.status == expected, (case, answer.status, answer.body[:300])
    if route.check:
        route.check(world, ctx, case, answer)
    # exactly one audit row, naming the route, the outcome and (when known) who and the study
    rows = [r for r in world.store.audit_entries(limit=50) if r.pk > last_pk]
    assert [(r.action, r.outcome) for r in rows] == [(f"{route.method} {path.split('?')[0]}", str(answer.status))]
    [row] = rows
    assert row.channel == "http" and row.remote == "127.0.0.1"
    if case in ("no_credentials", "bad_token", "expired_token"):
        assert (row.actor_kind, row.organization) == ("none", None)
        if case != "no_credentials":
            assert row.detail, "a refused credential's audit row says why"
    else:
        assert row.organization == (OTHER if case == "other_organization" else LOCAL)
        assert row.actor_kind == _kind(credential), (credential, row.actor_kind)
    if route.study_in_audit:
        assert row.study_uid == ctx.get("target", ctx["study"])


# --------------------------------------------------------------------------- beyond the matrix


def test_every_route_is_public_or_checks_its_credential(world: World) -> None:
    """A route of the running app is either marked public or wrapped by ``requires`` (which
    checks scope and role); a new route cannot slip in without either."""
    app = world.node.running.runner.app
    unchecked = []
    for route in app.router.routes():
        handler = route.handler
        if route.method == "OPTIONS" or getattr(handler, "__dicomnode_public__", False):
            continue
        if not hasattr(handler, "__wrapped__"):
            unchecked.append(f"{route.method} {route.resource.canonical}")
    assert unchecked == []


def test_metrics_from_loopback_without_credentials_is_refused(world: World) -> None:
    assert world.call("GET", "/metrics", {}).status == 401
    answer = world.call("GET", "/metrics", {"Authorization": world.tokens["key_admin"]})
    assert answer.status == 200 and b"dicomnode_" in answer.body


def test_other_organization_stow_of_a_new_instance_into_our_study_adds_nothing(world: World) -> None:
    target = world.store_study(LOCAL)
    intruder = corpus.ct_series(1, size=8, study_uid=target.StudyInstanceUID)[0]
    body, content_type = multipart_body([encoded(intruder)])
    answer = world.call("POST", f"/dicomweb/studies/{target.StudyInstanceUID}",
                        {"Authorization": world.tokens["other_key_write"], "Content-Type": content_type}, body)
    assert answer.status == 409
    assert [i.sop_instance_uid for i in world.archive.instances(target.StudyInstanceUID)] == [target.SOPInstanceUID]
    # and the other organization still cannot see it
    answer = world.call("GET", f"/dicomweb/studies/{target.StudyInstanceUID}/metadata",
                        {"Authorization": world.tokens["other_key_read"]})
    assert answer.status == 404


def test_qido_shows_each_organization_its_own_study(world: World) -> None:
    def listed(token: str) -> set[str]:
        answer = world.call("GET", "/dicomweb/studies?PatientID=MATRIX-*",
                            {"Authorization": world.tokens[token]})
        assert answer.status in (200, 204)
        return _uids(answer)

    assert world.ctx["study"] in listed("client_read") and world.ctx["their_study"] not in listed("client_read")
    assert world.ctx["their_study"] in listed("other_key_read") and world.ctx["study"] not in listed("other_key_read")


def test_admin_reads_the_audit_of_a_study_over_http(world: World) -> None:
    study = world.ctx["study"]
    world.call("GET", f"/dicomweb/studies/{study}/metadata", {"Authorization": world.tokens["key_read"]})
    world.call("GET", f"/dicomweb/studies/{study}/metadata", {})
    answer = world.call("GET", f"/api/audit?study={study}", {"Authorization": world.tokens["admin_user"]})
    assert answer.status == 200
    entries = answer.json()["entries"]
    assert entries and all(e["study_uid"] == study for e in entries)
    assert {e["organization"] for e in entries} == {LOCAL}
    assert ("key_read", "200") in {(e["actor"], e["outcome"]) for e in entries}


def test_ups_event_channel_carries_only_the_callers_organizations_events(world: World) -> None:
    """Two organizations open the channel of the same AE title: each hears of its own
    workitems only. Events are queued in the order they are emitted, so the other
    organization's first message is its own workitem's, unless ours leaked before it."""
    import asyncio

    import aiohttp

    ours, theirs = world.workitem(LOCAL), world.workitem(OTHER)
    url = f"ws://127.0.0.1:{world.node.http_port}/dicomweb/subscribers/MATRIXWS"

    async def first_messages() -> tuple[str, str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, headers={"Authorization": world.tokens["key_worklist"]}) as local_ws, \
                    session.ws_connect(url, headers={"Authorization": world.tokens["other_key_worklist"]}) as other_ws:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, world.archive.workitems.subscribe, "MATRIXWS", ours, LOCAL)
                await loop.run_in_executor(None, world.archive.workitems.subscribe, "MATRIXWS", theirs, OTHER)
                local_first = (await local_ws.receive_json(timeout=30))["00001000"]["Value"][0]
                other_first = (await other_ws.receive_json(timeout=30))["00001000"]["Value"][0]
                return local_first, other_first

    assert asyncio.run(first_messages()) == (ours, theirs)
    assert world.call("GET", "/dicomweb/subscribers/MATRIXWS", {}).status == 401


def test_archive_refuses_another_organizations_instance_before_replacing_its_file(tmp_path) -> None:
    """The one ingest path (C-STORE, STOW-RS, import, inbox): the same SOP Instance UID sent
    for another organization is refused and the stored file keeps its bytes."""
    from storage import Archive, Conflict

    archive = Archive(tmp_path / "archive")
    try:
        original = corpus.ct_series(1, size=8)[0]
        archive.store_bytes(encoded(original), Source("test", organization="hospital-a"))
        [item] = archive.instances(original.StudyInstanceUID)
        with archive.open_instance(item) as fh:
            before = fh.read()
        changed = original.copy()
        changed.PatientName = "INTRUDER^WAS^HERE"
        with pytest.raises(Conflict):
            archive.store_bytes(encoded(changed), Source("test", organization="hospital-b"))
        [item] = archive.instances(original.StudyInstanceUID)
        with archive.open_instance(item) as fh:
            assert fh.read() == before
    finally:
        archive.close()


def test_archive_refuses_an_instance_for_a_study_another_organization_made_again_after_a_delete(tmp_path) -> None:
    """The archive remembers the studies it just stored into (no query for the next
    instance of the same study); one deleted and made again by another organization is
    still refused, and leaves no file."""
    from storage import Archive, Conflict

    archive = Archive(tmp_path / "archive")
    try:
        first, second, third = corpus.ct_series(3, size=8)
        study = first.StudyInstanceUID
        archive.store_bytes(encoded(first), Source("test", organization="hospital-a"))
        assert archive.delete(study) == 1
        archive.store_bytes(encoded(second), Source("test", organization="hospital-b"))
        with pytest.raises(Conflict):
            archive.store_bytes(encoded(third), Source("test", organization="hospital-a"))
        assert [item.sop_instance_uid for item in archive.instances(study)] == [second.SOPInstanceUID]
        archive.flusher.drain(10)
        files = [p for p in (tmp_path / "archive" / "blobs").rglob("*") if p.is_file()]
        assert [p.name for p in files] == [f"{second.SOPInstanceUID}.dcm"]
    finally:
        archive.close()
