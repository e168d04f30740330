"""Organization scoping and scopes on the DICOMweb routes, with real principals.

The identity store (issue 4) is not here yet, so the caller's principal is set by a
small middleware in front of the real app (``[auth] required = true``): the routes, the
auth checks and the archive are the real ones."""
from __future__ import annotations

import pytest
from aiohttp import web

from dicomweb import create_app
from dicomweb.auth import PRINCIPAL, Principal
from storage import Archive, Source
from tests import corpus
from tests.conftest import make_settings
from tests.dicomweb_http import encoded, multipart_body

WHO = {
    "reader-a": Principal("api_key", "reader-a", "A", frozenset({"dicomweb.read"})),
    "writer-a": Principal("api_key", "writer-a", "A", frozenset({"dicomweb.read", "dicomweb.write"})),
    "admin-a": Principal("api_key", "admin-a", "A", frozenset({"dicomweb.read"}), admin=True),
}


@web.middleware
async def principal_from_test_header(request: web.Request, handler):
    name = request.headers.get("X-Test-Principal")
    if name:
        request[PRINCIPAL] = WHO[name]
    return await handler(request)


@pytest.fixture
async def setup(tmp_path, aiohttp_client):
    archive = Archive(tmp_path / "data")
    app = create_app(make_settings(tmp_path / "data", auth={"required": True}), archive)
    app.middlewares.insert(0, principal_from_test_header)
    mine = corpus.ct_series(1, size=16, accession="MINE")[0]
    theirs = corpus.ct_series(1, size=16, accession="THEIRS")[0]
    archive.store_bytes(encoded(mine), Source("test", organization="A"))
    archive.store_bytes(encoded(theirs), Source("test", organization="B"))
    client = await aiohttp_client(app)
    yield client, archive, mine, theirs
    archive.close()


def _instance(ds, tail: str = "") -> str:
    return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}"


async def test_qido_shows_only_the_callers_organization(setup):
    client, _, mine, _ = setup
    response = await client.get("/dicomweb/studies", headers={"X-Test-Principal": "reader-a"})
    found = await response.json(content_type=None)
    assert [r["0020000D"]["Value"][0] for r in found] == [mine.StudyInstanceUID]


@pytest.mark.parametrize("tail", ["", "/metadata", "/frames/1", "/rendered", "/thumbnail", "/bulkdata/7FE00010"])
async def test_another_organizations_instance_answers_404(setup, tail):
    client, _, _, theirs = setup
    response = await client.get(_instance(theirs, tail), headers={"X-Test-Principal": "reader-a"})
    assert response.status == 404


async def test_another_organizations_study_answers_404_over_wado_uri(setup):
    client, _, _, theirs = setup
    response = await client.get("/dicomweb/wado", headers={"X-Test-Principal": "reader-a"}, params={
        "requestType": "WADO", "studyUID": theirs.StudyInstanceUID, "seriesUID": theirs.SeriesInstanceUID,
        "objectUID": theirs.SOPInstanceUID, "contentType": "application/dicom"})
    assert response.status == 404


async def test_an_admin_cannot_delete_another_organizations_study(setup):
    client, archive, _, theirs = setup
    response = await client.delete(f"/dicomweb/studies/{theirs.StudyInstanceUID}", headers={"X-Test-Principal": "admin-a"})
    assert response.status == 404
    assert archive.instances(theirs.StudyInstanceUID)


async def test_delete_needs_an_admin(setup):
    client, archive, mine, _ = setup
    response = await client.delete(f"/dicomweb/studies/{mine.StudyInstanceUID}", headers={"X-Test-Principal": "writer-a"})
    assert response.status == 403
    assert archive.instances(mine.StudyInstanceUID)


async def test_stow_needs_the_write_scope(setup):
    client, archive, _, _ = setup
    body, content_type = multipart_body([encoded(corpus.ct_series(1, size=16)[0])])
    response = await client.post("/dicomweb/studies", data=body, headers={
        "X-Test-Principal": "reader-a", "Content-Type": content_type})
    assert response.status == 403
    assert "dicomweb.write" in (await response.json())["error"]
    assert archive.counts()["instances"] == 2


async def test_stow_stores_for_the_callers_organization(setup):
    client, archive, _, _ = setup
    ds = corpus.ct_series(1, size=16)[0]
    body, content_type = multipart_body([encoded(ds)])
    response = await client.post("/dicomweb/studies", data=body, headers={
        "X-Test-Principal": "writer-a", "Content-Type": content_type})
    assert response.status == 200
    assert archive.instances(ds.StudyInstanceUID, organizations=("A",))
    assert not archive.instances(ds.StudyInstanceUID, organizations=("B",))
