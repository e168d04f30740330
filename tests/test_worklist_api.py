"""Seed 004 ``/workitems``: create, list by patient, delete; validation and auth."""
from __future__ import annotations

import requests

from tests.worklist_helpers import SEED_ENTRY, created_workitem, post_workitem, seed_entry, study_uid_of


def _workitems(node, **params) -> list[dict]:
    response = requests.get(f"{node.base_url}/workitems", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_post_workitem_generates_study_uid_under_node_root(start_node):
    node = start_node(ae={"uid_root": "1.2.826.0.1.3680043.10.999"})
    entry = created_workitem(node)
    assert study_uid_of(entry).startswith("1.2.826.0.1.3680043.10.999.")


def test_get_workitems_by_patient_id_is_shaped_as_the_seed(node):
    entry = created_workitem(node)
    created_workitem(node, PatientID="SOMEONE-ELSE", AccessionNumber="OTHER")
    [found] = _workitems(node, patientID=SEED_ENTRY["PatientID"])
    assert found == entry
    assert found["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "ROSSI^MARIO"}]}
    assert found["00080090"] == {"vr": "PN"}
    [step] = found["00400100"]["Value"]
    assert step["00080060"]["Value"] == ["CT"]
    assert step["00400001"]["Value"] == ["NGV"]
    assert step["00400002"]["Value"] == ["20000101"]
    assert step["00400003"]["Value"] == ["120000"]
    assert step["00400007"]["Value"] == ["Tac"]
    assert step["00400009"] == {"vr": "SH"}
    for tag in ("00080050", "00100020", "00100030", "00100040", "00102000", "001021C0", "0020000D",
                "00321032", "00321060", "00380010", "00380300", "00380500", "00401001", "00402016", "00403001"):
        assert tag in found


def test_post_workitem_with_existing_study_uid_is_409(node):
    study_uid = "1.2.752.24.5.2584605181.20150129083013.816906"
    created_workitem(node, StudyInstanceUID=study_uid)
    response = post_workitem(node, StudyInstanceUID=study_uid, AccessionNumber="SECOND")
    assert response.status_code == 409
    assert study_uid in response.json()["error"]
    assert len(_workitems(node)) == 1


def test_post_workitem_missing_fields_is_400_naming_them(node):
    fields = seed_entry()
    del fields["Modality"], fields["AccessionNumber"]
    response = requests.post(f"{node.base_url}/workitems", json=fields, timeout=30)
    assert response.status_code == 400
    body = response.json()
    assert "Modality" in body["error"] and "AccessionNumber" in body["error"]
    assert body["missing"] == ["Modality", "AccessionNumber"]
    assert _workitems(node) == []


def test_post_workitem_unknown_keyword_is_400(node):
    response = post_workitem(node, FavouriteColour="blue")
    assert response.status_code == 400
    assert "FavouriteColour" in response.json()["error"]
    assert _workitems(node) == []


def test_post_workitem_value_of_wrong_shape_is_400(node):
    response = post_workitem(node, PatientName=["ROSSI", "MARIO"])
    assert response.status_code == 400
    assert "PatientName" in response.json()["error"]
    assert _workitems(node) == []


def test_post_workitem_date_not_valid_for_its_vr_is_400(node):
    response = post_workitem(node, ScheduledProcedureStepStartDate="2000-01-01")
    assert response.status_code == 400
    assert "ScheduledProcedureStepStartDate" in response.json()["error"]
    assert _workitems(node) == []


def test_post_workitem_that_is_not_json_is_400(node):
    response = requests.post(f"{node.base_url}/workitems", data=b"{not json", timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_post_workitem_huge_body_is_413(node):
    response = post_workitem(node, MedicalAlerts="x" * (2 << 20))
    assert response.status_code == 413
    assert "bytes" in response.json()["error"]
    assert _workitems(node) == []


def test_delete_workitem_by_study_uid_is_204_and_removes_it(node):
    entry = created_workitem(node)
    response = requests.delete(f"{node.base_url}/workitems/{study_uid_of(entry)}", timeout=30)
    assert response.status_code == 204
    assert response.content == b""
    assert _workitems(node) == []


def test_delete_unknown_workitem_is_404(node):
    response = requests.delete(f"{node.base_url}/workitems/1.2.3.4", timeout=30)
    assert response.status_code == 404


def test_post_workitem_without_credentials_is_401_when_auth_is_required(start_node):
    node = start_node(auth={"required": True})
    response = post_workitem(node)
    assert response.status_code == 401
    assert "credentials" in response.json()["error"]
    assert list(node.archive.workitems.find({})) == []
