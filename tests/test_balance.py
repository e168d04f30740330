"""Connections spread over the node's processes (node/balance.py, cli/http_accept.py):
a process serving more connections than another leaves new ones to it."""
from __future__ import annotations

import socket
import threading

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cli.runtime import open_archive
from node import DicomNode
from node.balance import NOT_ACCEPTING, ConnectionCounts, left_to_another, waiting
from tests.conftest import make_settings
from tests.support import wait_until


def _counts(*slots: int, index: int = 0) -> ConnectionCounts:
    return ConnectionCounts(list(slots), index)


# ------------------------------------------------------------------ the counts


def test_a_process_serving_more_than_another_is_busier():
    assert _counts(2, 1, 2).busier_than_another()


def test_a_process_serving_as_many_as_the_others_is_not_busier():
    assert not _counts(1, 1, 1).busier_than_another()


def test_a_process_that_does_not_accept_is_never_left_a_connection():
    assert not _counts(3, NOT_ACCEPTING, 3).busier_than_another()


def test_a_process_that_does_not_accept_serves_nothing_in_the_nodes_total():
    assert _counts(1, NOT_ACCEPTING, 2).others() == 2


def test_a_worker_has_no_count_until_it_publishes_one():
    counts = ConnectionCounts.shared(3)
    assert list(counts.slots) == [0, NOT_ACCEPTING, NOT_ACCEPTING]
    assert not counts.busier_than_another()


def test_a_gone_process_accepts_nothing():
    counts = _counts(1, 0)
    counts.clear(1)
    assert list(counts.slots) == [1, NOT_ACCEPTING]


# ------------------------------------------------------------------ leaving a connection


@pytest.fixture
def listening():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    clients: list[socket.socket] = []

    def connect() -> socket.socket:
        client = socket.create_connection(server.getsockname(), timeout=5)
        clients.append(client)
        wait_until(lambda: waiting(server), timeout=5, what="the connection to wait on the socket")
        return client

    yield server, connect
    for client in clients:
        client.close()
    server.close()


def test_a_busier_process_leaves_the_connection_to_one_that_takes_it(listening):
    server, connect = listening
    connect()
    taken = []
    other = threading.Timer(0.002, lambda: taken.append(server.accept()))  # another process, in short
    other.start()
    try:
        assert left_to_another(server, _counts(1, 0))
    finally:
        other.join()
        taken[0][0].close()
    assert not waiting(server)


def test_a_busier_process_accepts_the_connection_nobody_else_takes(listening):
    server, connect = listening
    connect()
    assert not left_to_another(server, _counts(1, 0))
    assert waiting(server)


def test_a_process_no_busier_than_the_others_accepts_at_once(listening):
    server, connect = listening
    connect()
    assert not left_to_another(server, _counts(1, 1))
    assert waiting(server)


# ------------------------------------------------------------------ a node's processes


@pytest.fixture
def counted_node(tmp_path):
    """A node of one process whose associations are counted in a shared slot (as a
    worker's are), with no periodic refresh of the count (a worker's ``tick``): what the
    slot says is what the association handlers published."""
    settings = make_settings(tmp_path)
    archive = open_archive(settings)
    counts = ConnectionCounts([0, NOT_ACCEPTING], 0)
    node = DicomNode(settings, archive, counts)
    node.start()
    yield node, counts
    node.stop(grace_s=5)
    archive.close()


def test_an_association_is_counted_from_its_acceptance_to_its_end(counted_node):
    # pynetdicom signals a new connection before the association's thread runs, and the
    # server counts running threads: the count published then must include it, or a
    # process that has just accepted looks idle and takes the next connection of a burst
    node, counts = counted_node
    ae = AE(ae_title="BALANCETEST")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae.title)
    second = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae.title)
    try:
        assert first.is_established and second.is_established
        assert counts.slots[0] == 2
        first.release()
        wait_until(lambda: counts.slots[0] == 1, timeout=5, what="the released association counted down")
        second.release()
        wait_until(lambda: counts.slots[0] == 0, timeout=5, what="both associations counted down")
    finally:
        for assoc in (first, second):
            if assoc.is_established:
                assoc.release()



def test_associations_held_at_once_are_spread_over_every_process(start_node):
    node = start_node(ae={"workers": 3})
    assert node.running.workers.wait_ready(60)
    counts = node.running.workers.counts
    wait_until(lambda: list(counts.slots) == [0, 0, 0], timeout=10, what="every process to accept")
    ae = AE(ae_title="BALANCETEST")
    ae.add_requested_context(Verification)
    held = []
    try:
        for opened in range(1, 4):
            assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
            assert assoc.is_established
            held.append(assoc)
            wait_until(lambda: sum(counts.slots) == opened, timeout=5, what=f"{opened} associations published")
        assert list(counts.slots) == [1, 1, 1]
    finally:
        for assoc in held:
            assoc.release()


def test_http_connections_opened_together_are_spread_over_every_process(start_node):
    node = start_node(http={"workers": 3})
    assert node.running.workers.wait_ready(60)
    counts = node.running.workers.http_counts
    wait_until(lambda: list(counts.slots) == [0, 0, 0], timeout=10, what="every process to accept")
    clients = [socket.create_connection(("127.0.0.1", node.http_port), timeout=5) for _ in range(3)]
    try:
        wait_until(lambda: sum(counts.slots) == 3, timeout=5, what="3 connections published")
        assert list(counts.slots) == [1, 1, 1]
        for client in clients:  # each process answers on its connection
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: list(counts.slots) == [0, 0, 0], timeout=5, what="closed connections counted down")
