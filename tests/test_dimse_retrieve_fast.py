"""C-MOVE and C-GET sub-operations send the stored dataset bytes unchanged when the
peer accepted the stored transfer syntax (node/outbound.py), re-encode them when it
accepted only another uncompressed one, and keep the statuses and counts: against
dcmtk storescp/getscu in bit-preserving mode and a pynetdicom storage SCP."""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_messages import C_MOVE_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.commands import retrieve_rsp_command, store_rq_command
from node.outbound import split_file_meta
from storage import Source
from tests import corpus
from tests.conftest import StoreSCP, dcmtk, free_port, start_storescp
from tests.dimse import identifier, store_roles


# ------------------------------------------------------------------ helpers


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset that follows the file meta group (read with pydicom)."""
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


def _stored_path(node, sop_uid: str) -> Path:
    [stored] = node.archive.instances(sop_instance_uids=(sop_uid,))
    return node.archive.instance_path(stored)


def _store(node, datasets: list[Dataset]) -> None:
    for path in corpus.save(datasets, node.data_dir.parent / f"src-{generate_uid()[-8:]}"):
        node.archive.store_file(path, Source("import", "test"))


def _implicit(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _move(node, identifier: Dataset, destination: str = "VIEWER") -> list[tuple[Dataset, Dataset | None]]:
    """(status, identifier) of each C-MOVE response."""
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()


def _movescu(node, study_uid: str) -> None:
    dcmtk("movescu", "-S", "-aec", node.ae_title, "-aem", "VIEWER", "-k", "QueryRetrieveLevel=STUDY",
          "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(node.ae_port), check=True)


def _getscu(node, study_uid: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-S", *flags, "-aec", node.ae_title, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(node.ae_port), check=True)


def _received(folder: Path, count: int, timeout: float = 30) -> dict[str, Path]:
    """The files a peer wrote, by SOP Instance UID, once ``count`` are complete."""
    deadline = time.monotonic() + timeout
    found: dict[str, Path] = {}
    while time.monotonic() < deadline:
        found = {}
        for path in folder.rglob("*"):
            try:
                found[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = path
            except Exception:
                continue  # still being written
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return found


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory: dcmtk storescp as VIEWER in bit-preserving mode (+B: the received
    dataset bytes written as they arrived) with extra transfer syntax flags."""
    started: list[subprocess.Popen] = []

    def start(*flags: str) -> StoreSCP:
        scp = start_storescp(tmp_path / f"received{len(started)}", "+B", *flags)
        started.append(scp.process)
        return scp

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def _mover(start_node, port: int):
    return start_node(peers=[{"ae_title": "VIEWER", "host": "127.0.0.1", "port": port}])


# ------------------------------------------------------------------ C-MOVE: bytes as stored


@pytest.mark.parametrize(("name", "make", "flags"), [
    ("explicit_le", lambda: corpus.ct_series(2), ()),
    ("implicit_le", lambda: [_implicit(ds) for ds in corpus.ct_series(2)], ("+xa",)),
    ("rle", lambda: [corpus.compressed(RLELossless)], ("+xa",)),
])
def test_moved_dataset_arrives_byte_identical_to_the_stored_one(start_node, storescp, name, make, flags):
    scp = storescp(*flags)
    node = _mover(start_node, scp.port)
    datasets = make()
    _store(node, datasets)
    _movescu(node, datasets[0].StudyInstanceUID)
    received = _received(scp.folder, len(datasets))
    assert set(received) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        stored = _stored_path(node, ds.SOPInstanceUID)
        got = received[ds.SOPInstanceUID]
        assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert _dataset_bytes(got) == _dataset_bytes(stored)


def test_move_re_encodes_for_a_destination_that_accepts_only_implicit(start_node, storescp):
    scp = storescp("+xi")
    node = _mover(start_node, scp.port)
    [ds] = corpus.ct_series(1)
    _store(node, [ds])
    final, _ = _move(node, identifier("STUDY", StudyInstanceUID=ds.StudyInstanceUID))[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 1)
    got = pydicom.dcmread(_received(scp.folder, 1)[ds.SOPInstanceUID])
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PixelData == ds.PixelData
    assert got.PatientName == ds.PatientName


def test_move_of_a_compressed_instance_the_destination_cannot_take_fails_that_suboperation(start_node, storescp):
    scp = storescp()  # uncompressed syntaxes only
    node = _mover(start_node, scp.port)
    [plain] = corpus.ct_series(1)
    rle = corpus.compressed(RLELossless)
    rle.StudyInstanceUID = plain.StudyInstanceUID
    _store(node, [plain, rle])
    final, failed = _move(node, identifier("STUDY", StudyInstanceUID=plain.StudyInstanceUID))[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert failed.FailedSOPInstanceUIDList == rle.SOPInstanceUID
    assert set(_received(scp.folder, 1)) == {plain.SOPInstanceUID}


def test_move_counts_an_unreadable_stored_file_as_failed(start_node, storescp):
    scp = storescp()
    node = _mover(start_node, scp.port)
    datasets = corpus.ct_series(3)
    _store(node, datasets)
    path = _stored_path(node, datasets[1].SOPInstanceUID)
    path.unlink()
    path.write_bytes(b"this is not a DICOM file")
    final, failed = _move(node, identifier("STUDY", StudyInstanceUID=datasets[0].StudyInstanceUID))[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert set(_received(scp.folder, 2)) == {datasets[0].SOPInstanceUID, datasets[2].SOPInstanceUID}


def test_move_to_a_destination_that_does_not_answer_is_refused_with_a801(start_node):
    node = _mover(start_node, free_port())  # nothing listens there
    [ds] = corpus.ct_series(1)
    _store(node, [ds])
    final, _ = _move(node, identifier("STUDY", StudyInstanceUID=ds.StudyInstanceUID))[-1]
    assert final.Status == 0xA801


def test_cancel_during_a_move_ends_it_with_fe00(start_node):
    """A pynetdicom storage SCP holds the first sub-operation until the C-CANCEL is on
    the wire, so the cancel arrives mid-move."""
    first_stored, cancel_on_wire = threading.Event(), threading.Event()
    cancel_requested = threading.Event()
    received: list[str] = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        if len(received) == 1:
            first_stored.set()
            cancel_on_wire.wait(10)
        return 0x0000

    def on_pdu_sent(event):
        if cancel_requested.is_set():
            cancel_on_wire.set()

    dest = AE(ae_title="VIEWER")
    dest.add_supported_context(corpus.CT_IMAGE, ALL_TRANSFER_SYNTAXES)
    server = dest.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = _mover(start_node, server.server_address[1])
        datasets = corpus.ct_series(20)
        _store(node, datasets)
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title,
                             evt_handlers=[(evt.EVT_PDU_SENT, on_pdu_sent)])
        assert assoc.is_established
        try:
            responses = assoc.send_c_move(identifier("STUDY", StudyInstanceUID=datasets[0].StudyInstanceUID),
                                          "VIEWER", StudyRootQueryRetrieveInformationModelMove, msg_id=7)
            assert first_stored.wait(10)
            cancel_requested.set()
            assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelMove)
            statuses = [status for status, _ in responses]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert 1 <= final.NumberOfCompletedSuboperations < len(datasets)
    assert final.NumberOfRemainingSuboperations == len(datasets) - final.NumberOfCompletedSuboperations
    assert len(received) < len(datasets)


# ------------------------------------------------------------------ C-GET: bytes as stored


def test_got_explicit_le_dataset_arrives_byte_identical_to_the_stored_one(start_node, node, tmp_path):
    datasets = corpus.ct_series(2)
    _store(node, datasets)
    _getscu(node, datasets[0].StudyInstanceUID, tmp_path / "got", "+B")
    received = _received(tmp_path / "got", 2)
    assert set(received) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        got = received[ds.SOPInstanceUID]
        assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert _dataset_bytes(got) == _dataset_bytes(_stored_path(node, ds.SOPInstanceUID))


def test_got_dataset_is_byte_identical_also_when_sent_through_the_dul(node, tmp_path, caplog):
    """With pynetdicom's DEBUG log on, messages are not written to the socket directly
    but handed to the DUL as P-DATA primitives (node/outbound.py writable_socket)."""
    caplog.set_level(logging.DEBUG, logger="pynetdicom")
    datasets = corpus.ct_series(2)
    _store(node, datasets)
    _getscu(node, datasets[0].StudyInstanceUID, tmp_path / "got", "+B")
    received = _received(tmp_path / "got", 2)
    for ds in datasets:
        assert _dataset_bytes(received[ds.SOPInstanceUID]) == _dataset_bytes(_stored_path(node, ds.SOPInstanceUID))


def test_got_rle_dataset_arrives_byte_identical_to_the_stored_one(node, tmp_path):
    rle = corpus.compressed(RLELossless)
    _store(node, [rle])
    _getscu(node, rle.StudyInstanceUID, tmp_path / "got", "+B", "+xr")
    got = _received(tmp_path / "got", 1)[rle.SOPInstanceUID]
    assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == RLELossless
    assert _dataset_bytes(got) == _dataset_bytes(_stored_path(node, rle.SOPInstanceUID))


def _get_study(node, study_uid: str, syntaxes: list[list[str]], on_store) -> list:
    """C-GET of a study by a pynetdicom SCU proposing one CT storage context per list of
    ``syntaxes``; the responses (``on_store`` takes the sub-operations)."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for context_syntaxes in syntaxes:
        ae.add_requested_context(corpus.CT_IMAGE, context_syntaxes)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title, ext_neg=store_roles([corpus.CT_IMAGE]),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study_uid),
                                     StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()


def test_get_re_encodes_for_an_scu_that_accepts_only_implicit(node):
    [ds] = corpus.ct_series(1)
    _store(node, [ds])
    received: list[tuple[str, Dataset]] = []

    def on_store(event):
        received.append((event.context.transfer_syntax, event.dataset))
        return 0x0000

    responses = _get_study(node, ds.StudyInstanceUID, [[ImplicitVRLittleEndian]], on_store)
    assert (responses[-1][0].Status, responses[-1][0].NumberOfCompletedSuboperations) == (0x0000, 1)
    [(syntax, got)] = received
    assert syntax == ImplicitVRLittleEndian
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData


def test_get_sends_each_stored_syntax_in_the_context_the_scu_proposed_for_it(node):
    """An SCU proposing two contexts for one SOP class (uncompressed, RLE) gets each
    instance as stored, in the context that has its syntax."""
    [plain] = corpus.ct_series(1)
    rle = corpus.compressed(RLELossless)
    rle.StudyInstanceUID = plain.StudyInstanceUID
    _store(node, [plain, rle])
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = (event.context.transfer_syntax, event.dataset.PixelData)
        return 0x0000

    responses = _get_study(node, plain.StudyInstanceUID, [[ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                                          [RLELossless]], on_store)
    assert (responses[-1][0].Status, responses[-1][0].NumberOfCompletedSuboperations) == (0x0000, 2)
    assert received[plain.SOPInstanceUID] == (ExplicitVRLittleEndian, plain.PixelData)
    assert received[rle.SOPInstanceUID] == (RLELossless, rle.PixelData)


# ------------------------------------------------------------------ encodings, against pynetdicom's


def test_c_store_request_command_is_encoded_as_pynetdicom_encodes_it():
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = corpus.CT_IMAGE
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert store_rq_command(7, corpus.CT_IMAGE, "1.2.3.4.5", 2, "MOVESCU", 3) == expected


def test_pending_move_response_command_is_encoded_as_pynetdicom_encodes_it():
    primitive = C_MOVE()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelMove
    primitive.Status = 0xFF00
    primitive.NumberOfRemainingSuboperations = 9
    primitive.NumberOfCompletedSuboperations = 2
    primitive.NumberOfFailedSuboperations = 1
    primitive.NumberOfWarningSuboperations = 0
    message = C_MOVE_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert retrieve_rsp_command(0x8021, 5, 0xFF00, StudyRootQueryRetrieveInformationModelMove, 9, 2, 1, 0) == expected


def test_file_meta_is_split_where_pydicom_ends_it(tmp_path):
    [path] = corpus.save(corpus.ct_series(1), tmp_path)
    raw = path.read_bytes()
    offset, meta = split_file_meta(raw)
    assert raw[offset:] == _dataset_bytes(path)
    assert meta[0x0010] == ExplicitVRLittleEndian
