"""Modality Worklist C-FIND with dcmtk ``findscu -W`` against workitems made over HTTP."""
from __future__ import annotations

from pathlib import Path

import pydicom
import requests

from tests import corpus
from tests.conftest import dcmtk
from tests.worklist_helpers import SEED_ENTRY, created_workitem, study_uid_of, workitem_uid_of_study

SPS = "ScheduledProcedureStepSequence[0]"
RETURN_KEYS = (
    "PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "RequestedProcedureID",
    f"{SPS}.Modality", f"{SPS}.ScheduledStationAETitle", f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime", f"{SPS}.ScheduledProcedureStepDescription",
)


def worklist_query(node, out: Path, *matches: str) -> list[pydicom.Dataset]:
    """Run ``findscu -W`` with the return keys plus ``matches`` (``Key=value``); the
    responses, read back from the files findscu extracts."""
    out.mkdir(exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    keys = dict(k.split("=", 1) if "=" in k else (k, "") for k in (*RETURN_KEYS, *matches))
    args = []
    for key, value in keys.items():
        args += ["-k", f"{key}={value}" if value else key]
    dcmtk("findscu", "-W", "-X", "-od", str(out), "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *args,
          check=True)
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_finds_workitem_posted_over_http_with_the_same_values(node, tmp_path):
    entry = created_workitem(node)
    [found] = worklist_query(node, tmp_path / "rsp", f"{SPS}.ScheduledStationAETitle=NGV")
    assert found.PatientID == SEED_ENTRY["PatientID"]
    assert str(found.PatientName) == SEED_ENTRY["PatientName"]
    assert found.AccessionNumber == SEED_ENTRY["AccessionNumber"]
    assert found.StudyInstanceUID == study_uid_of(entry)
    step = found.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT"
    assert step.ScheduledStationAETitle == "NGV"
    assert step.ScheduledProcedureStepStartDate == "20000101"
    assert step.ScheduledProcedureStepStartTime == "120000"
    assert step.ScheduledProcedureStepDescription == "Tac"


def test_findscu_matches_station_ae_title(node, tmp_path):
    created_workitem(node, ScheduledStationAETitle="CT1", AccessionNumber="A-CT1")
    created_workitem(node, ScheduledStationAETitle="MR1", AccessionNumber="A-MR1")
    found = worklist_query(node, tmp_path / "rsp", f"{SPS}.ScheduledStationAETitle=MR1")
    assert [d.AccessionNumber for d in found] == ["A-MR1"]


def test_findscu_matches_start_date_range(node, tmp_path):
    created_workitem(node, ScheduledProcedureStepStartDate="20260101", AccessionNumber="JAN")
    created_workitem(node, ScheduledProcedureStepStartDate="20260301", AccessionNumber="MAR")
    created_workitem(node, ScheduledProcedureStepStartDate="20260601", AccessionNumber="JUN")
    found = worklist_query(node, tmp_path / "rsp", f"{SPS}.ScheduledProcedureStepStartDate=20260201-20260501")
    assert [d.AccessionNumber for d in found] == ["MAR"]


def test_findscu_matches_start_time_range(node, tmp_path):
    created_workitem(node, ScheduledProcedureStepStartTime="080000", AccessionNumber="MORNING")
    created_workitem(node, ScheduledProcedureStepStartTime="150000", AccessionNumber="AFTERNOON")
    found = worklist_query(node, tmp_path / "rsp", f"{SPS}.ScheduledProcedureStepStartTime=1200-")
    assert [d.AccessionNumber for d in found] == ["AFTERNOON"]


def test_findscu_matches_modality(node, tmp_path):
    created_workitem(node, Modality="CT", AccessionNumber="A-CT")
    created_workitem(node, Modality="MR", AccessionNumber="A-MR")
    found = worklist_query(node, tmp_path / "rsp", f"{SPS}.Modality=MR")
    assert [d.AccessionNumber for d in found] == ["A-MR"]


def test_findscu_matches_patient_name_wildcard_case_insensitively(node, tmp_path):
    created_workitem(node, PatientName="ROSSI^MARIO", PatientID="P1", AccessionNumber="A1")
    created_workitem(node, PatientName="VERDI^GIUSEPPE", PatientID="P2", AccessionNumber="A2")
    found = worklist_query(node, tmp_path / "rsp", "PatientName=rossi*")
    assert [d.PatientID for d in found] == ["P1"]


def test_findscu_matches_patient_id_and_accession_number(node, tmp_path):
    created_workitem(node, PatientID="P1", AccessionNumber="A1")
    created_workitem(node, PatientID="P1", AccessionNumber="A2")
    created_workitem(node, PatientID="P2", AccessionNumber="A3")
    found = worklist_query(node, tmp_path / "rsp", "PatientID=P1", "AccessionNumber=A2")
    assert [(d.PatientID, d.AccessionNumber) for d in found] == [("P1", "A2")]


def test_findscu_returns_requested_procedure_id(node, tmp_path):
    created_workitem(node, RequestedProcedureID="RP-7")
    [found] = worklist_query(node, tmp_path / "rsp")
    assert found.RequestedProcedureID == "RP-7"


def test_findscu_does_not_list_a_canceled_workitem(node, tmp_path):
    entry = created_workitem(node)
    uid = workitem_uid_of_study(node, study_uid_of(entry))
    response = requests.post(f"{node.base_url}/dicomweb/workitems/{uid}/cancelrequest", timeout=30)
    assert response.status_code == 202
    assert worklist_query(node, tmp_path / "rsp") == []


def test_study_root_c_find_is_still_answered_by_query_retrieve(node, tmp_path):
    paths = corpus.save(corpus.ct_series(1, size=16), tmp_path / "ct")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)
    out = tmp_path / "qr"
    out.mkdir()
    dcmtk("findscu", "-S", "-X", "-od", str(out), "-aec", node.ae_title, "127.0.0.1", str(node.ae_port),
          "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", check=True)
    [found] = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
    assert found.StudyInstanceUID == pydicom.dcmread(paths[0]).StudyInstanceUID
