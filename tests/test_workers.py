"""Worker processes (``[ae] workers``, ``[http] workers``): more processes accepting
associations and HTTP connections on the node's ports, over the same archive."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from bench.servers import child_pids
from storage.events import InstanceStored
from tests import corpus
from tests.conftest import dcmtk, make_settings
from tests.dicomweb_http import stow_datasets
from tests.identity_helpers import Credentials, bearer
from tests.worklist_helpers import change_state_over_dimse, new_transaction_uid, ups_dataset

SUMMARY = "/api/developer/profiles/activity-summary/"
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


def _store_on_every_process(node, end: str = "release") -> list:
    """One instance stored over an association with each process; then each
    association is released (or aborted)."""
    held = _associations_on_every_process(node)
    datasets = corpus.ct_series(len(held), size=32)
    try:
        for assoc, ds in zip(held, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            getattr(assoc, end)()
    return datasets


@pytest.fixture
def two_process_node(start_node):
    node = start_node(ae={"workers": 2})
    assert node.running.workers.wait_ready(60)
    return node


def test_a_worker_process_stores_into_the_same_archive(two_process_node):
    node = two_process_node
    datasets = _store_on_every_process(node)
    for ds in datasets:
        assert _stored(node, ds) is not None


def _stored(node, ds):
    return node.archive.instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_instances_a_worker_stores_are_announced_in_the_serving_process(two_process_node):
    node = two_process_node
    announced: list[str] = []
    node.archive.events.subscribe(InstanceStored, lambda e: announced.append(e.result.sop_instance_uid))
    datasets = _store_on_every_process(node)
    wait_until(lambda: len(announced) == len(datasets), timeout=10)
    assert sorted(announced) == sorted(ds.SOPInstanceUID for ds in datasets)


def test_a_workers_counters_reach_the_serving_processs_metrics(two_process_node):
    node = two_process_node
    datasets = _store_on_every_process(node)
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
    datasets = _store_on_every_process(node, end="abort")
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
    workers = child_pids(process.process.pid)
    assert workers
    process.kill()
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=30)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_serve_with_workers_stops_them_on_sigterm(serve, tmp_path):
    process = serve(tmp_path / "data", toml="[ae]\nworkers = 2\n")
    wait_until(lambda: "worker 1 (pid" in process.log(), timeout=60)
    workers = child_pids(process.process.pid)
    assert workers
    process.signal(signal.SIGTERM)
    assert process.wait_exit(60) == 0
    assert "stopped cleanly" in process.log()
    # multiprocessing's resource tracker ends on its own once the serving process is gone
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10)


# ------------------------------------------------------------------ HTTP workers


@pytest.fixture
def http_workers_node(start_node):
    node = start_node(http={"workers": 2})
    assert node.running.workers.wait_ready(60)
    return node


def _served_by_workers(node) -> float:
    return node.running.workers.relayed["dicomnode_http_requests_total"]


def test_stow_served_by_an_http_worker_stores_into_the_same_archive(http_workers_node):
    node = http_workers_node
    datasets = corpus.ct_series(20, size=32)
    for ds in datasets:  # a connection each: the kernel gives each to one process
        assert stow_datasets(node.base_url, [ds]).status_code == 200
    wait_until(lambda: _served_by_workers(node) > 0, timeout=10, what="a request served by the worker")
    for ds in datasets:
        assert _stored(node, ds) is not None


def test_a_rate_limit_counts_the_calls_of_every_process(start_node):
    node = start_node(http={"workers": 2}, auth={"required": True})
    assert node.running.workers.wait_ready(60)
    credentials = Credentials(node)
    key = credentials.api_key(plan="developer")  # 60 calls a minute
    statuses = [requests.get(credentials.url(SUMMARY), headers=bearer(key), timeout=30).status_code
                for _ in range(70)]
    assert statuses.count(200) == 60
    assert statuses.count(429) == 10
    wait_until(lambda: _served_by_workers(node) > 0, timeout=10, what="a request served by the worker")


def test_metrics_answered_by_any_process_are_the_nodes(http_workers_node):
    node = http_workers_node
    for ds in corpus.ct_series(10, size=32):
        assert stow_datasets(node.base_url, [ds]).status_code == 200

    def every_answer_counts_all() -> bool:
        answers = [requests.get(node.base_url + "/metrics", timeout=30).text for _ in range(8)]
        return all('dicomnode_instances_stored_total{source="http"} 10\n' in text for text in answers)

    wait_until(every_answer_counts_all, timeout=10, what="every process's /metrics to count 10 instances")
    assert _served_by_workers(node) > 0


async def test_every_websocket_subscriber_hears_workitem_events_whichever_process_holds_it(http_workers_node):
    node = http_workers_node
    uid = await asyncio.to_thread(created_workitem_over_http, node)
    ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/WEBVIEWER"
    sessions = [aiohttp.ClientSession() for _ in range(6)]  # a connection each
    try:
        channels = [await session.ws_connect(ws_url) for session in sessions]
        async with sessions[0].post(f"{node.base_url}/dicomweb/workitems/{uid}/subscribers/WEBVIEWER") as response:
            assert response.status == 201
        status = await asyncio.to_thread(change_state_over_dimse, node, uid, "IN PROGRESS", new_transaction_uid())
        assert status == 0x0000
        for ws in channels:
            event = await _next_event(ws, "IN PROGRESS")
            assert event["00001000"]["Value"] == [uid]
    finally:
        for session in sessions:
            await session.close()
    # a channel's request is counted when it closes
    await asyncio.to_thread(wait_until, lambda: _served_by_workers(node) > 0, 10, what="a channel held by the worker")


def created_workitem_over_http(node) -> str:
    uid = generate_uid()
    response = requests.post(f"{node.base_url}/dicomweb/workitems", params={"workitem": uid},
                             data=json.dumps([ups_dataset().to_json_dict()]),
                             headers={"Content-Type": "application/dicom+json"}, timeout=30)
    assert response.status_code == 201, response.text
    return uid


async def _next_event(ws, state: str) -> dict:
    while True:
        message = await asyncio.wait_for(ws.receive_json(), timeout=30)
        if message.get("00741000", {}).get("Value") == [state]:
            return message


def test_http_workers_out_of_range_are_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="http.workers"):
        make_settings(tmp_path, http={"workers": 65})
