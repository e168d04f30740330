"""The metadata cache is filled in the background after ingest: once the prefill has
drained, the first /metadata of a new series parses no instance file and answers what
the files say; entries follow deletes and replacements; ingest never waits for it."""
from __future__ import annotations

import threading
import time

import pydicom
import pytest
import requests

from storage import Source
from storage.metadata_cache import MetadataPrefill
from tests import corpus
from tests.conftest import NodeThread, make_settings
from tests.dicomweb_http import encoded, stow_datasets
from tests.test_dicomweb_metadata_cache import JSON, _metadata_url, _reference

SOURCE = Source("test", "prefill", "127.0.0.1", "")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node for the module (each test stores its own study)."""
    running = NodeThread(make_settings(tmp_path_factory.mktemp("prefill") / "data")).start()
    yield running
    running.stop()


def _prefill(node) -> MetadataPrefill:
    return node.running.metadata_prefill


def _no_parsing(monkeypatch) -> list[str]:
    """Make every pydicom parse fail (and note it) from now on."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(str(args[0])[:80] if args else "?")
        raise AssertionError("an instance file was parsed")

    monkeypatch.setattr(pydicom, "dcmread", refuse)
    monkeypatch.setattr(pydicom.filereader, "dcmread", refuse)
    return calls


def test_after_the_prefill_the_first_metadata_parses_no_file(node, monkeypatch):
    datasets = corpus.ct_series(30, size=8)
    stow_datasets(node.base_url, datasets)
    assert _prefill(node).drain(60)
    ds = datasets[0]
    stored = node.archive.instances(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    expected = _reference(node.archive, stored, f"{node.base_url}/dicomweb")
    calls = _no_parsing(monkeypatch)
    response = requests.get(_metadata_url(node, ds.StudyInstanceUID, ds.SeriesInstanceUID), headers=JSON, timeout=30)
    assert response.status_code == 200, response.text
    assert calls == []
    assert response.content == expected


def test_every_level_answers_from_the_prefilled_cache(node, monkeypatch):
    items = corpus.mixed_corpus()
    stow_datasets(node.base_url, items)
    assert _prefill(node).drain(60)
    archive = node.archive
    addresses = {(ds.StudyInstanceUID,) for ds in items} | {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in items}
    expected = {a: _reference(archive, archive.instances(*a), f"{node.base_url}/dicomweb") for a in addresses}
    calls = _no_parsing(monkeypatch)
    for address, body in expected.items():
        response = requests.get(_metadata_url(node, *address), headers=JSON, timeout=30)
        assert response.content == body, address
    assert calls == []


def test_a_replaced_instance_gets_a_fresh_entry_and_the_old_one_goes(node):
    [ds] = corpus.ct_series(1, size=8)
    stow_datasets(node.base_url, [ds])
    assert _prefill(node).drain(60)
    [old] = node.archive.instances(ds.StudyInstanceUID)
    cache_root = node.data_dir / "cache" / "metadata"
    assert (cache_root / f"{old.blob_key}.json").is_file()
    ds.PatientName = "CHANGED^NAME"
    stow_datasets(node.base_url, [ds])
    assert _prefill(node).drain(60)
    [new] = node.archive.instances(ds.StudyInstanceUID)
    assert new.blob_key != old.blob_key
    assert node.archive.flusher.drain(10)  # the old file and its entry go after the acknowledgement
    assert not (cache_root / f"{old.blob_key}.json").exists()
    assert (cache_root / f"{new.blob_key}.json").is_file()
    body = requests.get(_metadata_url(node, ds.StudyInstanceUID), headers=JSON, timeout=30).json()
    assert body[0]["00100010"]["Value"][0]["Alphabetic"] == "CHANGED^NAME"


def test_a_deleted_series_leaves_no_entry(node):
    datasets = corpus.ct_series(3, size=8)
    stow_datasets(node.base_url, datasets)
    assert _prefill(node).drain(60)
    keys = [i.blob_key for i in node.archive.instances(datasets[0].StudyInstanceUID)]
    cache_root = node.data_dir / "cache" / "metadata"
    assert all((cache_root / f"{k}.json").is_file() for k in keys)
    node.archive.delete(datasets[0].StudyInstanceUID)
    assert _prefill(node).drain(60)
    node.archive.metadata_cache.flush()
    assert not any((cache_root / f"{k}.json").exists() for k in keys)


def test_ingest_never_waits_for_the_prefill(node):
    """A prefill stuck building an entry does not hold up the archive's emitter."""
    release = threading.Event()
    entered = threading.Event()

    def slow_build(item, ds):
        entered.set()
        release.wait(30)
        return b"{}"

    slow = MetadataPrefill(node.archive, "test-slow-1", slow_build).subscribe()
    try:
        datasets = corpus.ct_series(20, size=8)
        node.archive.store_bytes(encoded(datasets[0]), SOURCE)
        assert entered.wait(10)
        started = time.monotonic()
        for ds in datasets[1:]:
            node.archive.store_bytes(encoded(ds), SOURCE)
        assert time.monotonic() - started < 20  # finished while the builder was still blocked
        assert not release.is_set()
        assert len(node.archive.instances(datasets[0].StudyInstanceUID)) == 20
    finally:
        release.set()
        assert slow.drain(30)
        slow.close()


def test_pending_work_is_bounded_and_coalesced(node):
    built: list[str] = []
    gate = threading.Event()

    def build(item, ds):
        gate.wait(30)
        built.append(item.sop_instance_uid)
        return b"{}"

    prefill = MetadataPrefill(node.archive, "test-bounded-1", build, max_pending=5).subscribe()
    try:
        for ds in corpus.ct_series(12, size=8):
            node.archive.store_bytes(encoded(ds), SOURCE)
        assert prefill.dropped > 0
        gate.set()
        assert prefill.drain(30)
        assert 0 < len(built) <= 12
        assert len(set(built)) == len(built)  # each instance built once
    finally:
        gate.set()
        prefill.close()


def test_associations_and_http_requests_count_as_foreground_work(node):
    import time
    import urllib.request

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    foreground = node.archive.foreground
    deadline = time.monotonic() + 5
    while foreground.busy(0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not foreground.busy(0)
    ae = AE(ae_title="FGSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        assert foreground.busy(0)  # the prefill works at its low duty meanwhile
    finally:
        assoc.release()
    deadline = time.monotonic() + 5
    while foreground.busy(0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not foreground.busy(0)
    urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz").read()
    assert foreground.busy(1.0)  # just served
