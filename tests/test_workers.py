"""Worker processes (``[ae] workers``): more processes accepting associations on the
node's port, over the same archive."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from storage.events import InstanceStored
from tests import corpus
from tests.conftest import dcmtk, make_settings
from tests.support import acknowledged, serve, wait_until  # noqa: F401 (fixture)


def _scu() -> AE:
    ae = AE(ae_title="WORKERTEST")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae


def _slots(node) -> list[int]:
    return list(node.running.workers.counts.slots)


def _associations_on_every_process(node, most: int = 40, spare: bool = False) -> list:
    """Open associations (held open) until each process of the node serves one;
    ``spare``: release those that land on a process already serving one."""
    ae, held = _scu(), []
    processes = node.settings.ae.workers
    for _ in range(most):
        before = _slots(node)
        assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
        assert assoc.is_established
        wait_until(lambda: sum(_slots(node)) == sum(before) + 1, timeout=5)  # published on opening
        after = _slots(node)
        if spare and any(a > b > 0 for a, b in zip(after, before)):
            assoc.release()
            wait_until(lambda: _slots(node) == before, timeout=5)
            continue
        held.append(assoc)
        if all(after[i] > 0 for i in range(processes)):
            return held
    for assoc in held:
        assoc.release()
    pytest.fail(f"associations never reached every process: {_slots(node)}")


@pytest.fixture
def two_process_node(start_node):
    node = start_node(ae={"workers": 2})
    assert node.running.workers.wait_ready(60)
    return node


def test_a_worker_process_stores_into_the_same_archive(two_process_node):
    node = two_process_node
    held = _associations_on_every_process(node)
    datasets = corpus.ct_series(len(held), size=32)
    try:
        for assoc, ds in zip(held, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()
    for ds in datasets:
        assert _stored(node, ds) is not None


def _stored(node, ds):
    return node.archive.instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_instances_a_worker_stores_are_announced_in_the_serving_process(two_process_node):
    node = two_process_node
    announced: list[str] = []
    node.archive.events.subscribe(InstanceStored, lambda e: announced.append(e.result.sop_instance_uid))
    held = _associations_on_every_process(node)
    datasets = corpus.ct_series(len(held), size=32)
    try:
        for assoc, ds in zip(held, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()
    wait_until(lambda: len(announced) == len(datasets), timeout=10)
    assert sorted(announced) == sorted(ds.SOPInstanceUID for ds in datasets)


def test_a_workers_counters_reach_the_serving_processs_metrics(two_process_node):
    node = two_process_node
    held = _associations_on_every_process(node)
    datasets = corpus.ct_series(len(held), size=32)
    try:
        for assoc, ds in zip(held, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()
    metrics = node.archive.metrics
    wait_until(lambda: metrics.value("dicomnode_instances_stored_total", source="dimse") == len(datasets),
               timeout=10)
    assert metrics.value("dicomnode_dimse_requests_total", service="C-STORE", status="0x0000") == len(datasets)


def test_the_association_limit_holds_for_the_whole_node(start_node):
    node = start_node(ae={"workers": 2, "max_associations": 2})
    assert node.running.workers.wait_ready(60)
    held = _associations_on_every_process(node, spare=True)
    assert len(held) == 2
    try:
        ae = _scu()
        for _ in range(6):  # whichever process takes the connection refuses it
            extra = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
            assert extra.is_rejected
    finally:
        for assoc in held:
            assoc.release()
    wait_until(lambda: sum(_slots(node)) == 0, timeout=10)
    again = _scu().associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert again.is_established
    again.release()


def test_a_killed_worker_is_started_again_and_its_acknowledged_stores_are_kept(two_process_node, tmp_path):
    node = two_process_node
    held = _associations_on_every_process(node)
    datasets = corpus.ct_series(len(held), size=32)
    try:
        for assoc, ds in zip(held, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            assoc.abort()
    (old_pid,) = node.running.workers.pids()
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: node.running.workers.pids() not in ([], [old_pid]), timeout=30)
    assert node.running.workers.wait_ready(60)
    for ds in datasets:
        stored = _stored(node, ds)
        assert node.archive.blobs.exists(stored.blob_key)
    files = corpus.save(corpus.ct_series(4, size=32), tmp_path / "after")
    proc = dcmtk("storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, files))
    assert proc.returncode == 0, proc.stderr
    assert len(acknowledged(proc.stdout + proc.stderr)) == len(files)


def test_workers_out_of_range_are_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="ae.workers"):
        make_settings(tmp_path, ae={"workers": 0})


def test_workers_end_when_the_serving_process_is_killed(serve, tmp_path):
    process = serve(tmp_path / "data", toml="[ae]\nworkers = 2\n")
    wait_until(lambda: "worker 1 (pid" in process.log(), timeout=60)
    workers = _children(process.process.pid)
    assert workers
    process.kill()
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=30)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "python" in (entry / "cmdline").read_text():
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_serve_with_workers_stops_them_on_sigterm(serve, tmp_path):
    process = serve(tmp_path / "data", toml="[ae]\nworkers = 2\n")
    wait_until(lambda: "worker 1 (pid" in process.log(), timeout=60)
    workers = _children(process.process.pid)
    assert workers
    process.signal(signal.SIGTERM)
    assert process.wait_exit(60) == 0
    assert not any(_alive(pid) for pid in workers)
    assert "stopped cleanly" in process.log()
