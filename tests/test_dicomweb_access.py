"""Who may call the DICOMweb routes: credentials when [auth] required, and CORS."""
from __future__ import annotations

import pytest
import requests

from tests import corpus
from tests.dicomweb_http import stow_datasets

VIEWER = "https://viewer.example.org"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/dicomweb/studies"),
    ("POST", "/dicomweb/studies"),
    ("GET", "/dicomweb/studies/1.2.3/metadata"),
    ("GET", "/dicomweb/wado?requestType=WADO"),
    ("DELETE", "/dicomweb/studies/1.2.3"),
])
def test_without_credentials_a_route_answers_401_json(start_node, method, path):
    node = start_node(auth={"required": True})
    response = requests.request(method, f"{node.base_url}{path}", timeout=30)
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert "credentials" in response.json()["error"]
    assert "Bearer" in response.headers["WWW-Authenticate"]


def test_cors_preflight_from_a_listed_origin_is_allowed(start_node):
    node = start_node(http={"cors_origins": [VIEWER]}, auth={"required": True})
    response = requests.options(f"{node.base_url}/dicomweb/studies", timeout=30, headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization"


def test_cors_headers_are_on_answers_to_a_listed_origin_only(start_node):
    node = start_node(http={"cors_origins": [VIEWER]})
    allowed = requests.get(f"{node.base_url}/dicomweb/studies", headers={"Origin": VIEWER}, timeout=30)
    assert allowed.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Warning" in allowed.headers["Access-Control-Expose-Headers"]
    other = requests.get(f"{node.base_url}/dicomweb/studies", headers={"Origin": "https://evil.example"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_headers_are_on_error_answers_too(start_node):
    node = start_node(http={"cors_origins": [VIEWER]})
    response = requests.get(f"{node.base_url}/dicomweb/studies?limit=-1", headers={"Origin": VIEWER}, timeout=30)
    assert response.status_code == 400
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER


def test_cors_headers_are_on_streamed_retrievals(start_node):
    node = start_node(http={"cors_origins": ["*"]})
    ds = corpus.ct_series(1, size=16)[0]
    stow_datasets(node.base_url, [ds])
    response = requests.get(f"{node.base_url}/dicomweb/studies/{ds.StudyInstanceUID}", timeout=30,
                            headers={"Origin": VIEWER, "Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
