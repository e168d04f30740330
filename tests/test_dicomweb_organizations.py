"""Organization scoping and scopes on the DICOMweb routes, with real credentials: a node
started with ``[auth] required = true`` and API keys of organization "A" from the
identity store; the routes, the auth checks and the archive are the real ones."""
from __future__ import annotations

import pytest
import requests

from storage import Source
from tests import corpus
from tests.dicomweb_http import encoded, multipart_body

KEYS = {  # name: (scopes, admin)
    "reader-a": (("dicomweb.read",), False),
    "writer-a": (("dicomweb.read", "dicomweb.write"), False),
    "admin-a": (("dicomweb.read",), True),
}


@pytest.fixture
def setup(start_node):
    node = start_node(auth={"required": True})
    archive = node.archive
    keys = {name: archive.identity.create_api_key(name, organization="A", scopes=scopes, admin=admin)[1]
            for name, (scopes, admin) in KEYS.items()}
    mine = corpus.ct_series(1, size=16, accession="MINE")[0]
    theirs = corpus.ct_series(1, size=16, accession="THEIRS")[0]
    archive.store_bytes(encoded(mine), Source("test", organization="A"))
    archive.store_bytes(encoded(theirs), Source("test", organization="B"))

    def call(method: str, path: str, who: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {keys[who]}", **kwargs.pop("headers", {})}
        return requests.request(method, node.base_url + path, headers=headers, timeout=30, **kwargs)

    return call, archive, mine, theirs


def _instance(ds, tail: str = "") -> str:
    return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}"


def test_qido_shows_only_the_callers_organization(setup):
    call, _, mine, _ = setup
    response = call("GET", "/dicomweb/studies", "reader-a")
    assert response.status_code == 200
    assert [r["0020000D"]["Value"][0] for r in response.json()] == [mine.StudyInstanceUID]


@pytest.mark.parametrize("tail", ["", "/metadata", "/frames/1", "/rendered", "/thumbnail", "/bulkdata/7FE00010"])
def test_another_organizations_instance_answers_404(setup, tail):
    call, _, _, theirs = setup
    response = call("GET", _instance(theirs, tail), "reader-a")
    assert response.status_code == 404


def test_another_organizations_study_answers_404_over_wado_uri(setup):
    call, _, _, theirs = setup
    response = call("GET", "/dicomweb/wado", "reader-a", params={
        "requestType": "WADO", "studyUID": theirs.StudyInstanceUID, "seriesUID": theirs.SeriesInstanceUID,
        "objectUID": theirs.SOPInstanceUID, "contentType": "application/dicom"})
    assert response.status_code == 404


def test_an_admin_cannot_delete_another_organizations_study(setup):
    call, archive, _, theirs = setup
    response = call("DELETE", f"/dicomweb/studies/{theirs.StudyInstanceUID}", "admin-a")
    assert response.status_code == 404
    assert archive.instances(theirs.StudyInstanceUID)


def test_delete_needs_an_admin(setup):
    call, archive, mine, _ = setup
    response = call("DELETE", f"/dicomweb/studies/{mine.StudyInstanceUID}", "writer-a")
    assert response.status_code == 403
    assert archive.instances(mine.StudyInstanceUID)


def test_stow_needs_the_write_scope(setup):
    call, archive, _, _ = setup
    body, content_type = multipart_body([encoded(corpus.ct_series(1, size=16)[0])])
    response = call("POST", "/dicomweb/studies", "reader-a", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 403
    assert "dicomweb.write" in response.json()["error"]
    assert archive.counts()["instances"] == 2


def test_stow_stores_for_the_callers_organization(setup):
    call, archive, _, _ = setup
    ds = corpus.ct_series(1, size=16)[0]
    body, content_type = multipart_body([encoded(ds)])
    response = call("POST", "/dicomweb/studies", "writer-a", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 200
    assert archive.instances(ds.StudyInstanceUID, organizations=("A",))
    assert not archive.instances(ds.StudyInstanceUID, organizations=("B",))
