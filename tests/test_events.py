"""Archive events ("instance stored", "study stable") and the Prometheus /metrics page."""
from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from storage import InstanceStored, StudyStable
from tests import corpus
from tests.conftest import dcmtk
from tests.support import wait_until

STABLE_AFTER_S = 0.3


class Recorder:
    """Collects events of one type; ``wait`` blocks on a threading.Event until a
    predicate over what was collected holds."""

    def __init__(self, node, event_type: type) -> None:
        self.events: list = []
        self._changed = threading.Event()
        self._lock = threading.Lock()
        node.archive.events.subscribe(event_type, self._on)

    def _on(self, event) -> None:
        with self._lock:
            self.events.append(event)
        self._changed.set()

    def wait(self, predicate, timeout: float = 15.0, what: str = "events") -> list:
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while True:
                with self._lock:
                    snapshot = list(self.events)
                    self._changed.clear()
                if predicate(snapshot):
                    return snapshot
                if deadline.is_set():
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}: got {snapshot}")
                self._changed.wait(0.05)
        finally:
            timer.cancel()


def storescu(node, *paths: Path) -> None:
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)


def metrics(node) -> str:
    with urllib.request.urlopen(node.base_url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    line_start = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


# ------------------------------------------------------------------ instance stored


def test_instance_stored_fires_once_per_stored_instance(node, tmp_path):
    stored = Recorder(node, InstanceStored)
    files = corpus.save(corpus.ct_series(4, size=16), tmp_path / "in")
    storescu(node, *files)  # returns once every instance is acknowledged
    uids = [e.result.sop_instance_uid for e in stored.events]
    assert Counter(uids) == Counter(p.stem for p in files)


def test_instance_stored_says_which_instance_opened_a_new_study(node, tmp_path):
    stored = Recorder(node, InstanceStored)
    storescu(node, *corpus.save(corpus.ct_series(3, size=16), tmp_path / "in"))
    assert [e.new_study for e in stored.events] == [True, False, False]
    assert {e.source.kind for e in stored.events} == {"dimse"}


def test_instance_stored_fires_again_for_a_resend_marked_replaced(node, tmp_path):
    stored = Recorder(node, InstanceStored)
    [path] = corpus.save(corpus.ct_series(1, size=16), tmp_path / "in")
    storescu(node, path)
    storescu(node, path)
    assert [e.result.replaced for e in stored.events] == [False, True]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_refused_store_fires_no_event(node):
    stored = Recorder(node, InstanceStored)
    [ds] = corpus.ct_series(1, size=16)
    ds.StudyInstanceUID = "1.2.3/../../etc"
    assert send_with_pynetdicom(node, ds) != 0x0000
    assert stored.events == []


def send_with_pynetdicom(node, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="EVENTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


# ------------------------------------------------------------------ study stable


@pytest.fixture
def quick_node(start_node):
    return start_node(storage={"stable_after_s": STABLE_AFTER_S})


def count_for(events: list, study_uid: str) -> int:
    return sum(1 for e in events if e.study_uid == study_uid)


def test_study_stable_fires_once_after_the_study_is_quiet(quick_node, tmp_path):
    stable = Recorder(quick_node, StudyStable)
    series = corpus.ct_series(3, size=16)
    study_uid = series[0].StudyInstanceUID
    storescu(quick_node, *corpus.save(series, tmp_path / "a"))
    stable.wait(lambda ev: count_for(ev, study_uid) >= 1, what="study stable")
    # a second, later study becoming stable shows the monitor has run on since
    other = corpus.ct_series(1, size=16)
    storescu(quick_node, *corpus.save(other, tmp_path / "b"))
    events = stable.wait(lambda ev: count_for(ev, other[0].StudyInstanceUID) >= 1, what="the other study")
    assert count_for(events, study_uid) == 1


def test_study_stable_fires_again_only_after_new_instances_arrive(quick_node, tmp_path):
    stable = Recorder(quick_node, StudyStable)
    first = corpus.ct_series(2, size=16)
    study_uid = first[0].StudyInstanceUID
    storescu(quick_node, *corpus.save(first, tmp_path / "a"))
    stable.wait(lambda ev: count_for(ev, study_uid) == 1, what="first stable")
    late = corpus.ct_series(1, size=16, study_uid=study_uid)
    storescu(quick_node, *corpus.save(late, tmp_path / "b"))
    events = stable.wait(lambda ev: count_for(ev, study_uid) == 2, what="stable again after the late instance")
    assert count_for(events, study_uid) == 2


def test_study_stable_is_not_fired_for_a_study_still_receiving(start_node, tmp_path):
    node = start_node(storage={"stable_after_s": 300})
    stable = Recorder(node, StudyStable)
    storescu(node, *corpus.save(corpus.ct_series(2, size=16), tmp_path / "a"))
    assert node.archive.check_stable_studies() == []
    assert stable.events == []


# ------------------------------------------------------------------ /metrics


def test_metrics_count_instances_and_bytes_stored(node, tmp_path):
    files = corpus.save(corpus.ct_series(3, size=16), tmp_path / "in")
    storescu(node, *files)
    text = metrics(node)
    sizes = sum(s.size for s in node.archive.instances())
    assert metric(text, "dicomnode_instances_stored_total", source="dimse") == 3
    assert metric(text, "dicomnode_bytes_stored_total", source="dimse") == sizes
    assert metric(text, "dicomnode_dimse_requests_total", service="C-STORE", status="0x0000") == 3
    assert metric(text, "dicomnode_associations_total", outcome="accepted") == 1
    assert "# TYPE dicomnode_instances_stored_total counter" in text


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_metrics_count_a_refused_store_by_reason(node, tmp_path):
    storescu(node, *corpus.save(corpus.ct_series(1, size=16), tmp_path / "in"))
    [ds] = corpus.ct_series(1, size=16)
    ds.StudyInstanceUID = "1.2.3/../../etc"
    status = send_with_pynetdicom(node, ds)
    text = metrics(node)
    assert metric(text, "dicomnode_ingest_failures_total", reason="InvalidUID") == 1
    assert metric(text, "dicomnode_dimse_requests_total", service="C-STORE", status=f"0x{status:04X}") == 1
    assert metric(text, "dicomnode_instances_stored_total", source="dimse") == 1


def test_metrics_show_the_associations_open_now(node):
    wait_until(lambda: metric(metrics(node), "dicomnode_associations_active") == 0,
               what="no association open")
    assert "# TYPE dicomnode_associations_active gauge" in metrics(node)
