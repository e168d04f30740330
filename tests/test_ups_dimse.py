"""UPS over DIMSE (pynetdicom as the SCU): N-CREATE, N-GET, N-SET, N-ACTION, C-FIND,
the PS3.4 Annex CC state machine and its statuses, and N-EVENT-REPORT to subscribers."""
from __future__ import annotations

import queue

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import UnifiedProcedureStepEvent, UnifiedProcedureStepPull, UnifiedProcedureStepPush

from tests.conftest import free_port
from tests.worklist_helpers import change_state_over_dimse, new_transaction_uid, ups_association, ups_dataset

GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"


def _create(node, **changes) -> str:
    uid = generate_uid()
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_create(ups_dataset(**changes), UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    return uid


def _stored(node, uid: str):
    item = node.archive.workitems.get(uid)
    return item.state, item.transaction_uid, item.ups_view().to_json_dict()


def _performed(ds: Dataset | None = None) -> Dataset:
    changes = ds or Dataset()
    step = Dataset()
    step.PerformedProcedureStepStartDateTime = "20260102090500"
    step.PerformedProcedureStepEndDateTime = "20260102093000"
    changes.UnifiedProcedureStepPerformedProcedureSequence = Sequence([step])
    return changes


def _n_set(node, uid: str, changes: Dataset) -> int:
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_set(changes, UnifiedProcedureStepPull, uid)
    return status.Status


def _claim(node, uid: str) -> str:
    txn = new_transaction_uid()
    assert change_state_over_dimse(node, uid, "IN PROGRESS", txn) == 0x0000
    return txn


def test_n_create_then_n_get_returns_the_scheduled_workitem(node):
    uid = _create(node)
    with ups_association(node) as assoc:
        status, ds = assoc.send_n_get([0x00741000, 0x00100020, 0x00741204], UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    assert ds.ProcedureStepState == "SCHEDULED"
    assert ds.PatientID == "UPS001"
    assert ds.ProcedureStepLabel == "CT head"


def test_n_create_in_a_state_other_than_scheduled_is_c309(node):
    uid = generate_uid()
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_create(ups_dataset(ProcedureStepState="IN PROGRESS"), UnifiedProcedureStepPush, uid)
    assert status.Status == 0xC309
    assert list(node.archive.workitems.find({})) == []


def test_n_create_without_a_required_attribute_is_0120(node):
    ds = ups_dataset()
    del ds.ProcedureStepLabel
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, generate_uid())
    assert status.Status == 0x0120
    assert list(node.archive.workitems.find({})) == []


def test_n_create_of_an_existing_uid_is_0111(node):
    uid = _create(node)
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_create(ups_dataset(), UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0111


def test_n_get_of_an_unknown_workitem_is_c307(node):
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_get([0x00080018, 0x00741000], UnifiedProcedureStepPush, generate_uid())
    assert status.Status == 0xC307


def test_claim_update_and_complete_with_the_transaction_uid(node):
    uid = _create(node)
    txn = _claim(node, uid)
    changes = _performed()
    changes.TransactionUID = txn
    assert _n_set(node, uid, changes) == 0x0000
    assert change_state_over_dimse(node, uid, "COMPLETED", txn) == 0x0000
    state, _, view = _stored(node, uid)
    assert state == "COMPLETED"
    assert "00081195" not in view  # the Transaction UID is never returned


def test_completing_a_scheduled_workitem_is_c310_and_leaves_it_unchanged(node):
    uid = _create(node)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "COMPLETED", new_transaction_uid()) == 0xC310
    assert _stored(node, uid) == before


def test_canceling_a_scheduled_workitem_by_state_change_is_c310(node):
    uid = _create(node)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "CANCELED", new_transaction_uid()) == 0xC310
    assert _stored(node, uid) == before


def test_wrong_transaction_uid_is_c301_and_leaves_it_unchanged(node):
    uid = _create(node)
    _claim(node, uid)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "CANCELED", new_transaction_uid()) == 0xC301
    assert _stored(node, uid) == before


def test_claiming_an_in_progress_workitem_is_c302(node):
    uid = _create(node)
    _claim(node, uid)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "IN PROGRESS", new_transaction_uid()) == 0xC302
    assert _stored(node, uid) == before


def test_changing_state_to_scheduled_is_c303(node):
    uid = _create(node)
    assert change_state_over_dimse(node, uid, "SCHEDULED", new_transaction_uid()) == 0xC303


def test_completing_without_final_state_attributes_is_c304_and_leaves_it_unchanged(node):
    uid = _create(node)
    txn = _claim(node, uid)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "COMPLETED", txn) == 0xC304
    assert _stored(node, uid) == before


def _completed(node) -> tuple[str, str]:
    uid = _create(node)
    txn = _claim(node, uid)
    changes = _performed()
    changes.TransactionUID = txn
    assert _n_set(node, uid, changes) == 0x0000
    assert change_state_over_dimse(node, uid, "COMPLETED", txn) == 0x0000
    return uid, txn


def test_changing_a_completed_workitem_is_c300_and_leaves_it_unchanged(node):
    uid, txn = _completed(node)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "CANCELED", txn) == 0xC300
    assert change_state_over_dimse(node, uid, "IN PROGRESS", new_transaction_uid()) == 0xC300
    assert _stored(node, uid) == before


def test_completing_a_completed_workitem_again_is_warning_b306(node):
    uid, txn = _completed(node)
    before = _stored(node, uid)
    assert change_state_over_dimse(node, uid, "COMPLETED", txn) == 0xB306
    assert _stored(node, uid) == before


def test_updating_a_completed_workitem_is_c300_and_leaves_it_unchanged(node):
    uid, txn = _completed(node)
    before = _stored(node, uid)
    changes = Dataset()
    changes.ProcedureStepLabel = "changed"
    changes.TransactionUID = txn
    assert _n_set(node, uid, changes) == 0xC300
    assert _stored(node, uid) == before


def test_updating_an_in_progress_workitem_without_its_transaction_uid_is_c301(node):
    uid = _create(node)
    _claim(node, uid)
    before = _stored(node, uid)
    changes = Dataset()
    changes.ProcedureStepLabel = "changed"
    assert _n_set(node, uid, changes) == 0xC301
    assert _stored(node, uid) == before


def test_request_cancel_of_a_scheduled_workitem_cancels_it(node):
    uid = _create(node)
    info = Dataset()
    info.ReasonForCancellation = "patient left"
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 2, UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    assert node.archive.workitems.get(uid).state == "CANCELED"


def test_request_cancel_of_a_completed_workitem_is_c311(node):
    uid, _ = _completed(node)
    info = Dataset()
    info.ReasonForCancellation = "too late"
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 2, UnifiedProcedureStepPush, uid)
    assert status.Status == 0xC311
    assert node.archive.workitems.get(uid).state == "COMPLETED"


def test_ups_c_find_matches_procedure_step_state(node):
    scheduled = _create(node)
    claimed = _create(node)
    _claim(node, claimed)
    query = Dataset()
    query.ProcedureStepState = "IN PROGRESS"
    query.SOPInstanceUID = ""
    query.PatientID = ""
    with ups_association(node) as assoc:
        found = [ds for status, ds in assoc.send_c_find(query, UnifiedProcedureStepPull) if status.Status == 0xFF00]
    assert [ds.SOPInstanceUID for ds in found] == [claimed]
    assert scheduled != claimed


@pytest.fixture
def watcher():
    """A pynetdicom SCP that collects the N-EVENT-REPORTs it receives."""
    received: queue.Queue = queue.Queue()

    def on_report(event):
        received.put((event.event_type, event.request.AffectedSOPInstanceUID, event.event_information))
        return 0x0000, None

    ae = AE(ae_title="WATCHER")
    ae.add_supported_context(UnifiedProcedureStepEvent)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    yield port, received
    server.shutdown()


def _next_report(received: queue.Queue, state: str):
    """The next event report announcing ``state`` (earlier reports are skipped)."""
    while True:
        event_type, uid, info = received.get(timeout=30)
        if info.get("ProcedureStepState") == state:
            return event_type, uid, info


def test_subscribed_peer_receives_n_event_report_on_state_change(start_node, watcher):
    port, received = watcher
    node = start_node(peers=[{"ae_title": "WATCHER", "host": "127.0.0.1", "port": port}])
    uid = _create(node)
    info = Dataset()
    info.ReceivingAE = "WATCHER"
    info.DeletionLock = "FALSE"
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 3, UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    _claim(node, uid)
    event_type, reported_uid, _ = _next_report(received, "IN PROGRESS")
    assert (event_type, reported_uid) == (1, uid)


def test_global_subscriber_receives_reports_of_new_workitems(start_node, watcher):
    port, received = watcher
    node = start_node(peers=[{"ae_title": "WATCHER", "host": "127.0.0.1", "port": port}])
    info = Dataset()
    info.ReceivingAE = "WATCHER"
    info.DeletionLock = "FALSE"
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 3, UnifiedProcedureStepPush, GLOBAL_SUBSCRIPTION)
    assert status.Status == 0x0000
    uid = _create(node)
    _, reported_uid, _ = _next_report(received, "SCHEDULED")
    assert reported_uid == uid


def test_subscribing_an_ae_not_in_peers_is_c308(node):
    uid = _create(node)
    info = Dataset()
    info.ReceivingAE = "NOBODY"
    info.DeletionLock = "FALSE"
    with ups_association(node) as assoc:
        status, _ = assoc.send_n_action(info, 3, UnifiedProcedureStepPush, uid)
    assert status.Status == 0xC308


def test_a_peer_of_another_organization_does_not_see_the_workitem(start_node):
    node = start_node(peers=[{"ae_title": "UPSSCU", "host": "127.0.0.1", "port": free_port(),
                              "organization": "elsewhere"}])
    uid = node.archive.workitems.create(ups_dataset(), "local").uid
    with ups_association(node, "UPSSCU") as assoc:
        status, _ = assoc.send_n_get([0x00080018, 0x00741000], UnifiedProcedureStepPush, uid)
    assert status.Status == 0xC307
    assert node.archive.workitems.get(uid).state == "SCHEDULED"
