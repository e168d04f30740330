"""DIMSE associations in the audit log: calling AE, address, operations and counts."""
from __future__ import annotations

from storage import Archive
from tests.conftest import dcmtk


def _audit_after_stop(node) -> list:
    """Stopping the node waits for its associations to close, so their rows are in."""
    node.stop()
    archive = Archive(node.data_dir)
    try:
        return [e for e in archive.identity.audit_entries() if e.channel == "dimse"]
    finally:
        archive.close()


def test_association_is_audited_with_calling_ae_address_and_operation_counts(start_node, corpus_files):
    node = start_node(peers=[{"ae_title": "MODALITY", "host": "127.0.0.1", "port": 11199, "organization": "ward-7"}])
    dcmtk("echoscu", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), check=True)
    dcmtk("storescu", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port),
          str(corpus_files[0]), str(corpus_files[1]), check=True)
    rows = _audit_after_stop(node)
    assert [(r.actor, r.organization, r.outcome, r.detail) for r in reversed(rows)] == [
        ("MODALITY", "ward-7", "released", "C-ECHO x1"),
        ("MODALITY", "ward-7", "released", "C-STORE x2"),
    ]
    assert all(r.remote.startswith("127.0.0.1:") and r.action == "association" for r in rows)


def test_rejected_association_is_audited(start_node):
    node = start_node(ae={"require_known_peers": True})
    proc = dcmtk("echoscu", "-aet", "STRANGER", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port))
    assert proc.returncode != 0
    rows = _audit_after_stop(node)
    assert [(r.actor, r.outcome, r.detail) for r in rows] == [("STRANGER", "rejected", "unknown calling AE title")]


def test_known_peer_is_admitted_when_only_known_peers_may_associate(start_node):
    node = start_node(ae={"require_known_peers": True},
                      peers=[{"ae_title": "MODALITY", "host": "127.0.0.1", "port": 11199}])
    dcmtk("echoscu", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), check=True)
    rows = _audit_after_stop(node)
    assert [(r.actor, r.outcome) for r in rows] == [("MODALITY", "released")]
