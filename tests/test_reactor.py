"""The node's accepted associations use the event-driven reactor (node/reactor.py) and
behave as pynetdicom's: echo, store, find, release, abort, peer disconnect."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from node.reactor import EventDrivenAssociation
from tests import corpus


def _scu() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae


def _wait_until_no_associations(node, timeout: float = 10) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if not node.running.node.active_associations():
            return True
        done.wait(0.05)
    return False


def test_accepted_associations_are_event_driven_and_release_cleanly(node):
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    [accepted] = node.running.node.active_associations()
    assert isinstance(accepted, EventDrivenAssociation)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert _wait_until_no_associations(node)


def test_many_stores_and_a_multi_response_find_on_one_association(node):
    series = corpus.ct_series(20, patient=corpus.Patient(patient_id="REACTOR1"))
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    try:
        for ds in series:
            assert assoc.send_c_store(ds).Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.PatientID = "REACTOR1"
        query.StudyInstanceUID = series[0].StudyInstanceUID
        query.SeriesInstanceUID = series[0].SeriesInstanceUID
        query.SOPInstanceUID = ""
        statuses = [s.Status for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assert statuses.count(0xFF00) == 20 and statuses[-1] == 0x0000
    finally:
        assoc.release()
    assert _wait_until_no_associations(node)


def test_a_c_store_is_served_by_the_thread_that_received_it(node, caplog):
    caplog.set_level(logging.INFO, logger="dicomnode.archive")
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    [accepted] = node.running.node.active_associations()
    datasets = corpus.ct_series(3, size=16)
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    stored = [r for r in caplog.records if r.name == "dicomnode.archive" and r.getMessage().startswith("stored ")]
    assert len(stored) == len(datasets)
    # the DUL thread, not the association thread
    assert {r.thread for r in stored} == {accepted.dul.ident}


def test_peer_abort_ends_the_association(node):
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    assoc.abort()
    assert _wait_until_no_associations(node)


def test_peer_dropping_the_connection_ends_the_association(node):
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    assert _wait_until_no_associations(node)
    assoc.abort()


def test_bulk_recv_socket_reads_exactly_the_bytes_asked_for_and_stops_short_at_close():
    import socket as socket_module
    import threading as threading_module

    from node.reactor import BulkRecvSocket

    left, right = socket_module.socketpair()
    try:
        reader = BulkRecvSocket.__new__(BulkRecvSocket)
        reader.socket = left
        payload = bytes(range(256)) * 1024  # 256 KiB, sent in pieces

        def send():
            for start in range(0, len(payload), 7000):
                right.sendall(payload[start:start + 7000])
            right.sendall(b"tail")
            right.close()

        sender = threading_module.Thread(target=send)
        sender.start()
        assert reader.recv(len(payload)) == payload
        assert reader.recv(100) == bytearray(b"tail")  # the peer closed after 4 bytes
        sender.join(5)
    finally:
        left.close()


def test_associations_work_when_their_sockets_are_numbered_above_1023(node, tmp_path):
    # select() cannot watch descriptors above 1023; a busy node reaches them
    import os
    import resource

    from tests.conftest import dcmtk

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        import pytest

        pytest.skip(f"the open-file limit ({hard}) is too low to reach descriptor 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            filler.append(fd)
            if fd > 1100:
                break
        ds = corpus.ct_series(1)[0]
        path = tmp_path / "one.dcm"
        ds.save_as(path, enforce_file_format=True)
        dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), check=True)
        dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
        assert node.archive.instances(sop_instance_uids=(ds.SOPInstanceUID,))
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_each_association_gets_contexts_of_its_own_equal_to_a_deep_copy():
    import copy

    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

    from node.reactor import fresh_contexts

    ae = AE()
    for cx in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=False)
    server_contexts = ae.supported_contexts
    server_contexts[0].extra = {"a": [1]}  # anything else the contexts carry is copied deeply
    fresh = fresh_contexts(server_contexts)
    assert [vars(cx) for cx in fresh] == [vars(cx) for cx in copy.deepcopy(server_contexts)]
    fresh[0].transfer_syntax.append("1.2.3")
    fresh[0].extra["a"].append(2)
    fresh[1].context_id = 7
    assert "1.2.3" not in server_contexts[0].transfer_syntax
    assert server_contexts[0].extra == {"a": [1]}
    assert server_contexts[1].context_id is None


def test_associations_one_after_another_each_negotiate_from_the_nodes_own_contexts(node):
    for _ in range(3):
        assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
        assert assoc.is_established
        assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {
            Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind}
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def _context_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status:
        return sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread counts from Linux /proc")
def test_an_idle_association_thread_sleeps_between_requests(node):
    # its looks for a request, each an interpreter-lock hand-over on a busy node, come
    # IDLE_LOOK_S apart (50 ms), not every few milliseconds
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    try:
        assert assoc.is_established
        [served] = node.running.node.active_associations()
        before = _context_switches(served.native_id)
        time.sleep(1.0)
        assert _context_switches(served.native_id) - before < 50
        assert assoc.send_c_echo().Status == 0x0000  # and a request is still served at once
    finally:
        assoc.release()


def test_an_association_killed_by_the_node_ends_without_waiting_for_its_next_look(node, monkeypatch):
    from node import reactor

    monkeypatch.setattr(reactor, "IDLE_LOOK_S", 60.0)
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    [served] = node.running.node.active_associations()
    served.abort()  # what a stopping node does to associations still open
    served.join(20)
    assert not served.is_alive()


def test_a_release_is_answered_without_waiting_for_the_association_threads_next_look(node, monkeypatch):
    from node import reactor

    monkeypatch.setattr(reactor, "IDLE_LOOK_S", 60.0)  # its looks would now come a minute apart
    assoc = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    released = threading.Event()
    threading.Thread(target=lambda: (assoc.release(), released.set()), daemon=True).start()
    assert released.wait(20) and assoc.is_released
    assert _wait_until_no_associations(node)
