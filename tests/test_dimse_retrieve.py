"""C-MOVE to a dcmtk storescp listed in [[peers]], and C-GET on the same association,
against dcmtk movescu/getscu and pynetdicom SCUs."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from storage import Source
from tests import corpus
from tests.conftest import dcmtk
from tests.dimse import identifier, store_roles


@pytest.fixture
def mover(start_node, storescp):
    """A node that knows the storescp as peer VIEWER, with two series stored."""
    node = start_node(peers=[{"ae_title": "VIEWER", "host": "127.0.0.1", "port": storescp.port}])
    study = corpus.ct_series(3)
    second = corpus.ct_series(2, study_uid=study[0].StudyInstanceUID, series_number=2)
    for path in corpus.save(study + second, node.data_dir.parent / "src"):
        node.archive.store_file(path, Source("import", "test"))
    node.study = study + second
    return node


def _received_uids(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(p).SOPInstanceUID for p in files}


def _move(node, identifier: Dataset, destination: str = "VIEWER") -> list[Dataset]:
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_move(identifier, destination,
                                                         StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()


def _get(node, identifier: Dataset, received: list[Dataset]) -> list[Dataset]:
    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax)
    roles = store_roles([corpus.CT_IMAGE])
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()


def test_movescu_study_arrives_at_storescp(mover, storescp):
    uid = mover.study[0].StudyInstanceUID
    proc = dcmtk("movescu", "-S", "-aec", mover.ae_title, "-aem", "VIEWER", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(mover.ae_port))
    assert proc.returncode == 0, proc.stderr
    files = storescp.wait_for(5)
    assert _received_uids(files) == {ds.SOPInstanceUID for ds in mover.study}


def test_moved_instances_keep_their_pixel_data(mover, storescp):
    target = mover.study[0]
    _move(mover, identifier("IMAGE", StudyInstanceUID=target.StudyInstanceUID,
                             SeriesInstanceUID=target.SeriesInstanceUID, SOPInstanceUID=target.SOPInstanceUID))
    [received] = storescp.wait_for(1)
    got = pydicom.dcmread(received)
    assert got.PixelData == target.PixelData
    assert got.PatientName == target.PatientName


def test_move_series_level_sends_only_that_series(mover, storescp):
    second = mover.study[3]
    statuses = _move(mover, identifier("SERIES", StudyInstanceUID=second.StudyInstanceUID,
                                        SeriesInstanceUID=second.SeriesInstanceUID))
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 2
    assert _received_uids(storescp.wait_for(2)) == {ds.SOPInstanceUID for ds in mover.study[3:]}


def test_move_reports_pending_counts_then_success(mover, storescp):
    statuses = _move(mover, identifier("STUDY", StudyInstanceUID=mover.study[0].StudyInstanceUID))
    pending = [s for s in statuses if s.Status == 0xFF00]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == [4, 3, 2, 1, 0]
    final = statuses[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 5, 0)


def test_move_to_unknown_destination_is_refused_with_a801(mover, storescp):
    statuses = _move(mover, identifier("STUDY", StudyInstanceUID=mover.study[0].StudyInstanceUID),
                     destination="STRANGER")
    assert statuses[-1].Status == 0xA801
    assert storescp.files() == []


def test_move_without_the_unique_key_of_the_level_is_refused(mover, storescp):
    statuses = _move(mover, identifier("SERIES", StudyInstanceUID=mover.study[0].StudyInstanceUID))
    assert statuses[-1].Status == 0xA900


def test_move_with_a_missing_file_ends_with_warning_b000(mover, storescp):
    lost = mover.study[1]
    [stored] = mover.archive.instances(sop_instance_uids=(lost.SOPInstanceUID,))
    mover.archive.instance_path(stored).unlink()
    statuses = _move(mover, identifier("STUDY", StudyInstanceUID=lost.StudyInstanceUID))
    final = statuses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (4, 1)
    assert len(storescp.wait_for(4)) == 4


def test_getscu_retrieves_a_study_on_the_same_association(mover, tmp_path):
    out = tmp_path / "got"
    out.mkdir()
    uid = mover.study[0].StudyInstanceUID
    proc = dcmtk("getscu", "-S", "-aec", mover.ae_title, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(mover.ae_port))
    assert proc.returncode == 0, proc.stderr
    assert _received_uids(list(out.iterdir())) == {ds.SOPInstanceUID for ds in mover.study}


def test_get_image_level_returns_the_listed_instances(mover):
    a, b = mover.study[0], mover.study[4]
    received: list[Dataset] = []
    statuses = _get(mover, identifier("IMAGE", StudyInstanceUID=a.StudyInstanceUID,
                                       SOPInstanceUID=f"{a.SOPInstanceUID}\\{b.SOPInstanceUID}"), received)
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 2
    assert {ds.SOPInstanceUID for ds in received} == {a.SOPInstanceUID, b.SOPInstanceUID}


def test_get_with_a_missing_file_ends_with_warning_b000(mover):
    lost = mover.study[2]
    [stored] = mover.archive.instances(sop_instance_uids=(lost.SOPInstanceUID,))
    mover.archive.instance_path(stored).unlink()
    received: list[Dataset] = []
    statuses = _get(mover, identifier("STUDY", StudyInstanceUID=lost.StudyInstanceUID), received)
    final = statuses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (4, 1)
    assert len(received) == 4


def test_get_of_an_unknown_study_matches_nothing(mover):
    received: list[Dataset] = []
    statuses = _get(mover, identifier("STUDY", StudyInstanceUID="1.2.3.4.5.6.7"), received)
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].get("NumberOfCompletedSuboperations", 0) == 0
    assert received == []


def test_get_without_the_unique_key_of_the_level_is_refused(mover):
    received: list[Dataset] = []
    statuses = _get(mover, identifier("IMAGE", StudyInstanceUID=mover.study[0].StudyInstanceUID), received)
    assert statuses[-1].Status == 0xA900
    assert received == []
