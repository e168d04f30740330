"""C-STORE requests are received straight into the archive's temp folder, with the
same bytes pynetdicom would write and send (node/store_receipt.py)."""
from __future__ import annotations

import io

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pydicom.filewriter import write_file_meta_info

from node.commands import read_command_fields, store_rsp_command
from node.store_receipt import file_meta_bytes
from tests import corpus
from tests.conftest import dcmtk
from tests.support import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("instance_uid", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.1234567890123456789"])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_what_pynetdicom_writes(instance_uid, syntax):
    expected = io.BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CT, sop_instance_uid=instance_uid,
                                                    transfer_syntax=syntax))
    assert file_meta_bytes(CT, instance_uid, syntax) == expected.getvalue()


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB007])
@pytest.mark.parametrize("instance_uid", ["1.2.3", "1.2.34"])
def test_store_response_command_is_what_pynetdicom_encodes(status, instance_uid):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = instance_uid
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert store_rsp_command(7, status, CT, instance_uid) == encode(message.command_set, True, True)


def test_command_fields_are_read_by_element_number():
    command = store_rsp_command(9, 0x0000, CT, "1.2.3")
    fields = read_command_fields(command)
    assert fields[0x0100] == b"\x01\x80"  # C-STORE-RSP
    assert fields[0x0120] == (9).to_bytes(2, "little")
    assert read_command_fields(command[:-3]) is None  # cut inside a value
    assert read_command_fields(b"\x08\x00" + command[2:]) is None  # not group 0000


def test_received_dataset_is_written_to_the_archive_temp_folder_and_taken_over(node, tmp_path):
    ds = corpus.ct_series(1)[0]
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    seen = []
    original = node.archive.store_received_file

    def spy(temp, *args, **kwargs):
        seen.append(temp)
        return original(temp, *args, **kwargs)

    node.archive.store_received_file = spy
    try:
        dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    finally:
        del node.archive.store_received_file
    assert [p.parent for p in seen] == [node.archive.receive_folder()]
    assert seen[0].name.endswith(".dcm.part")  # written there by node/store_receipt.py, not moved
    [stored] = node.archive.instances(sop_instance_uids=(ds.SOPInstanceUID,))
    written = node.archive.instance_path(stored).read_bytes()
    sent = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(sent[140:144], "little")
    assert written[132 + 12 + int.from_bytes(written[140:144], "little"):] == sent[meta_end:]
    assert node.archive.flusher.drain(timeout=30)  # the temp name goes once the key's folder is synced
    assert [p for p in node.archive.receive_folder().rglob("*") if p.is_file()] == []


def _raw_association(node):
    """A pynetdicom association to ``node`` with one CT context, for sending P-DATA by hand."""
    from pynetdicom import AE

    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc, assoc.accepted_contexts[0].context_id


def _send_pdvs(assoc, context_id: int, *pdvs: tuple[bytes, int]) -> None:
    from pynetdicom.pdu_primitives import P_DATA

    for value, header in pdvs:
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, bytes((header,)) + value))
        assoc.dul.send_pdu(pdata)


def test_a_command_fragment_inside_a_dataset_aborts_and_keeps_nothing(node):
    import time

    assoc, context_id = _raw_association(node)
    try:
        command = _store_rq_command()
        _send_pdvs(assoc, context_id, (command, 0x03), (b"\x08\x00\x16\x00", 0x00), (command, 0x03))
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.abort()
    assert node.archive.counts()["instances"] == 0
    assert [p for p in node.archive.receive_folder().rglob("*") if p.is_file()] == []


def _store_rq_command(**extra) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RQ

    request = C_STORE()
    request.MessageID = 11
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    request.Priority = 2
    for name, value in extra.items():
        setattr(request, name, value)
    request.DataSet = io.BytesIO(b"\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize("extra", [
    {},
    {"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 3},
])
def test_store_request_is_what_pynetdicom_decodes(extra):
    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.dsutils import decode

    from node.commands import store_request

    command = _store_rq_command(**extra)
    message = DIMSEMessage()
    message.command_set = decode(io.BytesIO(command), True, True)
    message.__class__ = C_STORE_RQ
    expected = message.message_to_primitive()
    built = store_request(read_command_fields(command))
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(built, name) == getattr(expected, name), name


def test_an_unusual_store_command_is_left_to_pynetdicom():
    from node.commands import store_request

    fields = read_command_fields(_store_rq_command())
    assert store_request({**fields, 0x0902: b"odd element"}) is None
    assert store_request({**fields, 0x0700: b"\x07\x00"}) is None  # no such priority


@pytest.mark.parametrize("uid", [b"", b"1.02.3\x00", b"1.2.x\x00", b"1." + b"2" * 64, b"1.2.3.\x00"])
def test_a_store_command_with_a_uid_pynetdicom_would_refuse_or_warn_about_is_left_to_it(uid):
    from node.commands import store_request

    fields = read_command_fields(_store_rq_command())
    assert store_request({**fields, 0x1000: uid}) is None
    assert store_request({**fields, 0x0002: uid}) is None


def test_the_uids_of_a_built_store_request_are_pydicom_uids_as_pynetdicom_sets_them():
    from pydicom.uid import UID

    from node.commands import store_request

    built = store_request(read_command_fields(_store_rq_command()))
    assert type(built.AffectedSOPClassUID) is UID and type(built.AffectedSOPInstanceUID) is UID
    assert built.AffectedSOPClassUID.name == "CT Image Storage"


def test_an_association_aborted_inside_a_dataset_leaves_no_partial_file(node):
    assoc, context_id = _raw_association(node)
    _send_pdvs(assoc, context_id, (_store_rq_command(), 0x03), (b"\x08\x00\x16\x00" * 1000, 0x00))
    _wait_for_part_file(node)
    assoc.abort()
    _assert_nothing_kept(node)


@pytest.fixture
def threads_node(start_node, monkeypatch):
    """A node whose archive syncs on threads, as where the kernel cannot sync for the
    storing thread (storage/disk_sync.py): the name sync then begins with the receipt."""
    from storage import disk_sync

    monkeypatch.setattr(disk_sync, "available", lambda: False)
    return start_node()


def test_a_received_file_name_starts_being_synced_once_the_file_exists_and_only_then(threads_node, tmp_path,
                                                                                      monkeypatch):
    # The receive folder's sync (the name's durability) runs while the dataset arrives,
    # and the archive waits for that sync rather than starting its own.
    from storage.blobs import FileBlobStore

    node = threads_node

    paths = corpus.save(corpus.ct_series(3), tmp_path / "in")
    folder = node.archive.receive_folder()
    started, folder_syncs, handed = [], [], []
    start_name_sync, store_received_file = node.archive.start_name_sync, node.archive.store_received_file
    sync_temp_folder = FileBlobStore.sync_temp_folder

    def spy_start():
        started.append({p.name for p in folder.iterdir() if p.name.endswith(".dcm.part")})
        future = start_name_sync()
        started[-1] = (started[-1], future)
        return future

    def spy_store(path, *args, **kwargs):
        handed.append(kwargs.get("name_synced"))
        return store_received_file(path, *args, **kwargs)

    def spy_sync(self):
        folder_syncs.append(self)
        return sync_temp_folder(self)

    monkeypatch.setattr(node.running.node.ae, "dicomnode_name_sync", spy_start)
    monkeypatch.setattr(node.archive, "store_received_file", spy_store)
    monkeypatch.setattr(FileBlobStore, "sync_temp_folder", spy_sync)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)
    seen_before = [set()] + [names for names, _ in started[:-1]]
    assert len(started) == 3
    assert all(names - before for (names, _), before in zip(started, seen_before))  # each new file already there
    assert handed == [future for _, future in started]  # the archive got the sync it waits for
    assert all(future.done() and future.exception() is None for future in handed)
    assert len(folder_syncs) == 3  # one per instance, not a second one after the receipt
    assert node.archive.counts()["instances"] == 3


def test_a_received_file_name_sync_begins_in_the_kernel_with_the_receipt(node, tmp_path, monkeypatch):
    # Where the kernel syncs for the storing thread, the temp folder's sync begins as
    # the dataset starts arriving, and the acknowledgement waits for it, once per instance.
    import os

    from storage import disk_sync

    if not node.archive.syncs_together:
        pytest.skip("no kernel AIO syncs on this machine")
    paths = corpus.save(corpus.ct_series(3), tmp_path / "in")
    folder = str(node.archive.receive_folder())
    batches: list[list[str]] = []
    handed: list = []
    real_start, store_received_file = disk_sync.start, node.archive.store_received_file

    def spy_start(targets):
        batches.append([os.readlink(f"/proc/self/fd/{fd}") for fd, _ in targets])
        return real_start(targets)

    def spy_store(path, *args, **kwargs):
        handed.append(kwargs.get("name_synced"))
        return store_received_file(path, *args, **kwargs)

    monkeypatch.setattr(disk_sync, "start", spy_start)
    monkeypatch.setattr(node.archive, "store_received_file", spy_store)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)
    assert len(handed) == 3 and all(isinstance(begun, disk_sync.Pending) for begun in handed)
    assert [batch for batch in batches if folder in batch] == [[folder]] * 3  # begun alone, once each
    assert node.archive.counts()["instances"] == 3


def _assert_refused_and_nothing_kept(node, path) -> None:
    """storescu of ``path`` is refused with 0xA700, and no file is left behind."""
    proc = dcmtk("storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path))
    assert "I: Received Store Response (Refused: OutOfResources)" in proc.stdout + proc.stderr  # 0xA700
    assert node.archive.counts()["instances"] == 0
    assert [p for p in node.archive.receive_folder().iterdir() if p.is_file()] == []


def test_a_failed_name_sync_begun_with_the_receipt_refuses_the_instance_and_keeps_nothing(threads_node, tmp_path,
                                                                                          monkeypatch):
    from storage.blobs import FileBlobStore
    from storage.errors import StorageFailure

    node = threads_node

    def fail(self):
        raise StorageFailure("disk gone")

    [path] = corpus.save(corpus.ct_series(1), tmp_path / "in")
    monkeypatch.setattr(FileBlobStore, "sync_temp_folder", fail)
    _assert_refused_and_nothing_kept(node, path)


def test_a_failed_sync_before_the_acknowledgement_refuses_the_instance_and_keeps_nothing(node, tmp_path,
                                                                                         monkeypatch):
    from storage import disk_sync

    if not node.archive.syncs_together:
        pytest.skip("no kernel AIO syncs on this machine")

    real_start = disk_sync.start

    def start(targets):  # every sync the kernel runs fails
        pending = real_start(targets)
        pending.wait = lambda: [OSError(5, "Input/output error")] * len(targets)
        return pending

    [path] = corpus.save(corpus.ct_series(1), tmp_path / "in")
    monkeypatch.setattr(disk_sync, "start", start)
    _assert_refused_and_nothing_kept(node, path)


def test_a_large_dataset_is_handed_to_the_disk_as_it_arrives(node, tmp_path, monkeypatch):
    import os

    from node import store_receipt

    [path] = corpus.save(corpus.ct_series(1, size=1024), tmp_path / "in")  # ~2 MiB
    written_back = []
    real = store_receipt.start_writeback

    def spy(fd):
        written_back.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(store_receipt, "start_writeback", spy)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    [stored] = node.archive.instances()
    size = node.archive.instance_path(stored).stat().st_size
    assert len(written_back) >= size // (2 * store_receipt.WRITEBACK_BYTES)  # a step may end inside a PDU
    assert all(name.endswith(".dcm.part") for name, _ in written_back)  # the file being received
    sizes = [written for _, written in written_back]
    assert sizes == sorted(set(sizes)) and sizes[0] < size // 2  # from early on, as the dataset grew


def test_starting_writeback_on_a_descriptor_that_has_none_is_harmless():
    import os

    from storage.blobs import start_writeback

    read_end, write_end = os.pipe()
    try:
        start_writeback(write_end)  # advisory: the fdatasync that follows reports real failures
    finally:
        os.close(read_end)
        os.close(write_end)


def _part_files(node) -> list:
    return [p for p in node.archive.receive_folder().iterdir() if p.name.endswith(".dcm.part")]


def _wait_for_part_file(node) -> None:
    wait_until(lambda: _part_files(node), timeout=10, interval=0.02, what="the dataset being received")


def _assert_nothing_kept(node) -> None:
    folder = node.archive.receive_folder()
    wait_until(lambda: not [p for p in folder.iterdir() if p.is_file()], timeout=10, interval=0.02,
               what="the receive folder to be empty")
    assert node.archive.counts()["instances"] == 0


def _assert_aborted_and_nothing_kept(node, assoc) -> None:
    wait_until(lambda: assoc.is_aborted, timeout=10, interval=0.02, what="the association to be aborted")
    _assert_nothing_kept(node)


@pytest.mark.parametrize("items", [
    (3).to_bytes(4, "big") + b"\x01\x00\x00\x00\x00",  # an item shorter than its length field says
    (9999).to_bytes(4, "big") + b"\x01\x00" + b"\x00" * 16,  # an item running past the PDU's end
    (1).to_bytes(4, "big") + b"\x01",  # an item with a context ID and no message header
], ids=["item-cut-short", "item-past-the-end", "item-without-header"])
def test_a_data_pdu_whose_items_do_not_add_up_inside_a_dataset_aborts_and_keeps_nothing(node, items):
    assoc, context_id = _raw_association(node)
    try:
        _send_pdvs(assoc, context_id, (_store_rq_command(), 0x03), (b"\x08\x00\x16\x00" * 100, 0x00))
        _wait_for_part_file(node)
        assoc.dul.socket.send(b"\x04\x00" + len(items).to_bytes(4, "big") + items)
        _assert_aborted_and_nothing_kept(node, assoc)
    finally:
        if assoc.is_established:
            assoc.abort()


def test_a_connection_closed_inside_a_data_pdu_keeps_nothing(node):
    import socket
    import struct

    assoc, context_id = _raw_association(node)
    _send_pdvs(assoc, context_id, (_store_rq_command(), 0x03), (b"\x08\x00\x16\x00" * 100, 0x00))
    _wait_for_part_file(node)
    raw = assoc.dul.socket.socket
    pdv = b"\x00" + b"\x08\x00\x16\x00" * 250  # a dataset fragment, not the last
    item = struct.pack(">L", len(pdv) + 1) + bytes((context_id,)) + pdv
    raw.send(b"\x04\x00" + struct.pack(">L", len(item)) + item[:100])  # a tenth of it
    raw.shutdown(socket.SHUT_RDWR)
    _assert_nothing_kept(node)
    assoc.abort()
