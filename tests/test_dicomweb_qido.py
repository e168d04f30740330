"""QIDO-RS parameters: paging, includefield, fuzzy matching and refused parameters."""
from __future__ import annotations

import pytest
import requests

from tests import corpus
from tests.conftest import NodeThread, make_settings
from tests.dicomweb_http import stow_datasets


@pytest.fixture(scope="module")
def node_with_studies(tmp_path_factory):
    node = NodeThread(make_settings(tmp_path_factory.mktemp("qido") / "data")).start()
    studies = [corpus.ct_series(2, size=16, accession=f"ACC{n}", study_date=f"2024010{n}") for n in range(1, 4)]
    stow_datasets(node.base_url, [ds for series in studies for ds in series])
    yield node, studies
    node.stop()


def _get(node, path: str, **params) -> requests.Response:
    return requests.get(f"{node.base_url}/dicomweb{path}", params=params, timeout=30)


def test_limit_cuts_the_result_and_says_so_in_a_warning(node_with_studies):
    node, _ = node_with_studies
    response = _get(node, "/studies", limit=2)
    assert response.status_code == 200
    assert len(response.json()) == 2
    assert response.headers["Warning"].startswith("299 ")


def test_offset_returns_the_rest_without_a_warning(node_with_studies):
    node, _ = node_with_studies
    first = [r["0020000D"]["Value"][0] for r in _get(node, "/studies", limit=2).json()]
    response = _get(node, "/studies", limit=2, offset=2)
    rest = [r["0020000D"]["Value"][0] for r in response.json()]
    assert len(rest) == 1 and not set(rest) & set(first)
    assert "Warning" not in response.headers


def test_date_range_matches_studies_inside_it(node_with_studies):
    node, _ = node_with_studies
    found = _get(node, "/studies", StudyDate="20240102-20240103").json()
    assert sorted(r["00080050"]["Value"][0] for r in found) == ["ACC2", "ACC3"]


def test_a_tag_works_like_its_keyword(node_with_studies):
    node, _ = node_with_studies
    found = _get(node, "/studies", **{"00080050": "ACC1"}).json()
    assert [r["00080050"]["Value"][0] for r in found] == ["ACC1"]


def test_includefield_returns_an_attribute_read_from_the_file(node_with_studies):
    node, studies = node_with_studies
    ds = studies[0][0]
    found = _get(node, f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances",
                 includefield="SliceThickness,00280030").json()
    assert found[0]["00180050"]["Value"] == [1.0]
    assert found[0]["00280030"]["Value"] == [0.5, 0.5]


def test_series_search_across_studies_returns_study_uid(node_with_studies):
    node, studies = node_with_studies
    found = _get(node, "/series", Modality="CT").json()
    assert {r["0020000D"]["Value"][0] for r in found} == {s[0].StudyInstanceUID for s in studies}


def test_fuzzymatching_matches_a_name_component_prefix(start_node):
    node = start_node()
    stow_datasets(node.base_url, corpus.ct_series(1, size=16, patient=corpus.Patient("P9", "SMITH^JOHN")))
    assert _get(node, "/studies", PatientName="joh").json() == []
    assert len(_get(node, "/studies", PatientName="joh", fuzzymatching="true").json()) == 1


@pytest.mark.parametrize(("params", "says"), [
    ({"limit": "-1"}, "limit"),
    ({"limit": "many"}, "limit"),
    ({"offset": "-3"}, "offset"),
    ({"colour": "red"}, "unknown query parameter"),
    ({"StudyDate": "2024-01-01x"}, "StudyDate"),
    ({"StudyDate": "20240101-2024"}, "StudyDate"),
    ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ({"InstitutionName": "X"}, "not supported"),
    ({"includefield": "NoSuchKeyword"}, "includefield"),
], ids=["limit-negative", "limit-text", "offset-negative", "unknown-param", "bad-date", "bad-range",
        "bad-fuzzy", "unmatchable-key", "bad-includefield"])
def test_bad_parameters_are_400_with_the_reason(node_with_studies, params, says):
    node, _ = node_with_studies
    response = _get(node, "/studies", **params)
    assert response.status_code == 400
    assert says in response.json()["error"]


def test_uid_with_path_characters_in_a_search_url_is_400(node_with_studies):
    node, _ = node_with_studies
    response = requests.get(f"{node.base_url}/dicomweb/studies/1.2.3%2F..%2F..%2Fx/series", timeout=10)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/json")


def test_search_refuses_an_accept_it_cannot_answer_with_406(node_with_studies):
    node, _ = node_with_studies
    response = requests.get(f"{node.base_url}/dicomweb/studies", headers={"Accept": "application/dicom+xml"}, timeout=10)
    assert response.status_code == 406


def test_a_comma_separated_uid_list_matches_each_study(node_with_studies):
    node, studies = node_with_studies
    wanted = [studies[0][0].StudyInstanceUID, studies[2][0].StudyInstanceUID]
    found = _get(node, "/studies", StudyInstanceUID=",".join(wanted)).json()
    assert sorted(r["0020000D"]["Value"][0] for r in found) == sorted(wanted)


def test_includefield_all_returns_every_indexed_attribute_of_the_level(node_with_studies):
    node, studies = node_with_studies
    ds = studies[0][0]
    [series] = _get(node, f"/studies/{ds.StudyInstanceUID}/series", includefield="all").json()
    assert series["00180015"]["Value"] == ["CHEST"]  # BodyPartExamined
    assert series["00081030"]["Value"] == ["CT CHEST"]  # StudyDescription, from the study level
