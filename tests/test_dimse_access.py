"""Who may associate: known peers, called AE title, and what the log says about them."""
from __future__ import annotations

import logging
import socket

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import dcmtk


def _echo(node, calling: str = "ECHOSCU", called: str | None = None):
    return dcmtk("echoscu", "-aet", calling, "-aec", called or node.ae_title, "127.0.0.1", str(node.ae_port))


def test_known_peer_may_associate_when_peers_are_required(start_node):
    node = start_node(ae={"require_known_peers": True},
                      peers=[{"ae_title": "MODALITY", "host": "127.0.0.1", "port": 104}])
    assert _echo(node, "MODALITY").returncode == 0


def test_unknown_calling_ae_is_rejected_when_peers_are_required(start_node, caplog):
    node = start_node(ae={"require_known_peers": True},
                      peers=[{"ae_title": "MODALITY", "host": "127.0.0.1", "port": 104}])
    with caplog.at_level(logging.WARNING, logger="dicomnode.node"):
        proc = _echo(node, "STRANGER")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr + proc.stdout
    assert any("STRANGER" in r.getMessage() and "[[peers]]" in r.getMessage() for r in caplog.records)


def test_known_ae_title_from_another_host_is_rejected(start_node):
    node = start_node(ae={"require_known_peers": True},
                      peers=[{"ae_title": "MODALITY", "host": "127.0.0.2", "port": 104}])
    proc = _echo(node, "MODALITY")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr + proc.stdout


def test_any_peer_may_associate_when_peers_are_not_required(node):
    assert _echo(node, "ANYONE").returncode == 0


def test_wrong_called_ae_title_is_rejected(node):
    proc = _echo(node, called="NOTUS")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr + proc.stdout


def test_association_log_names_the_peer_and_what_it_did(node, caplog):
    with caplog.at_level(logging.INFO, logger="dicomnode.node"):
        assert _echo(node, "CT_SCANNER").returncode == 0
    closing = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert any("CT_SCANNER@127.0.0.1" in m and "C-ECHO x1" in m for m in closing), closing


def test_accepted_sockets_have_nagle_disabled(node):
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        [server_side] = node.running.node.active_associations()
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_a_connection_that_never_associates_does_not_hold_up_shutdown(start_node):
    import threading

    node = start_node()
    with socket.create_connection(("127.0.0.1", node.ae_port)):
        stopper = threading.Thread(target=node.stop, kwargs={"grace_s": 60})
        stopper.start()
        stopper.join(timeout=20)  # a hang would wait out the 60 s grace period
        assert not stopper.is_alive()
