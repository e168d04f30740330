"""Shared pieces of the worklist and UPS tests: a seed 004 entry, a UPS dataset, and a
pynetdicom SCU associated with a running node."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)

SEED_ENTRY = {
    "PatientID": "SDJ38WMD1MS01",
    "PatientName": "ROSSI^MARIO",
    "ScheduledStationAETitle": "NGV",
    "ScheduledProcedureStepStartDate": "20000101",
    "ScheduledProcedureStepStartTime": "120000",
    "ScheduledProcedureStepDescription": "Tac",
    "Modality": "CT",
    "AccessionNumber": "NDS83JF784N209D2",
}


def seed_entry(**changes: Any) -> dict[str, Any]:
    return {**SEED_ENTRY, **changes}


def post_workitem(node, **changes: Any) -> requests.Response:
    return requests.post(f"{node.base_url}/workitems", json=seed_entry(**changes), timeout=30)


def created_workitem(node, **changes: Any) -> dict:
    """Create a seed 004 workitem and return its worklist entry (DICOM JSON)."""
    response = post_workitem(node, **changes)
    assert response.status_code == 200, response.text
    return response.json()


def study_uid_of(entry: dict) -> str:
    return entry["0020000D"]["Value"][0]


def workitem_uid_of_study(node, study_uid: str) -> str:
    """The UPS SOP Instance UID of the workitem of a study (as UPS-RS search finds it)."""
    response = requests.get(f"{node.base_url}/dicomweb/workitems", params={"StudyInstanceUID": study_uid}, timeout=30)
    assert response.status_code == 200, response.text
    [found] = response.json()
    return found["00080018"]["Value"][0]


def ups_dataset(**changes: Any) -> Dataset:
    """A minimal valid new UPS (PS3.4 Table CC.2.5-3 type 1 attributes)."""
    ds = Dataset()
    ds.PatientName = "BIANCHI^LUCA"
    ds.PatientID = "UPS001"
    ds.ScheduledProcedureStepPriority = "HIGH"
    ds.ProcedureStepLabel = "CT head"
    ds.WorklistLabel = "CT1"
    ds.ScheduledProcedureStepStartDateTime = "20260102090000"
    ds.InputReadinessState = "READY"
    ds.ProcedureStepState = "SCHEDULED"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@contextlib.contextmanager
def ups_association(node, ae_title: str = "UPSSCU") -> Iterator[Any]:
    """An association from a pynetdicom SCU offering the UPS SOP classes."""
    ae = AE(ae_title=ae_title)
    for sop_class in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch,
                      UnifiedProcedureStepEvent):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established, "the node refused the UPS association"
    try:
        yield assoc
    finally:
        assoc.release()


def change_state_over_dimse(node, uid: str, state: str, transaction_uid: str) -> int:
    info = Dataset()
    info.ProcedureStepState = state
    info.TransactionUID = transaction_uid
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 1, UnifiedProcedureStepPush, uid)
    return status.Status


def new_transaction_uid() -> str:
    return generate_uid()
