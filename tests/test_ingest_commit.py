"""The ingest commit overlaps its fsyncs with the index commits; what is acknowledged
is still on disk and in the index, and repair settles what a crash leaves."""
from __future__ import annotations

from pathlib import Path

import pytest

from storage import Archive, Source
from storage.blobs import FileBlobStore
from storage.errors import StorageFailure
from tests import corpus


def _bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _journal(archive: Archive) -> list:
    return archive.index.journal_entries()


def test_stored_instance_is_in_place_and_indexed_when_store_returns(tmp_path):
    archive = Archive(tmp_path / "a")
    try:
        ds = corpus.ct_series(1)[0]
        result = archive.store_bytes(_bytes(ds), Source("test"))
        [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
        assert archive.instance_path(stored).read_bytes() == _bytes(ds)
    finally:
        archive.close()


def test_finished_journal_rows_are_deleted_by_the_next_transaction_or_at_close(tmp_path):
    archive = Archive(tmp_path / "a")
    first, second = corpus.ct_series(2)
    archive.store_bytes(_bytes(first), Source("test"))
    assert len(_journal(archive)) == 1  # the finished row waits for the next transaction
    archive.store_bytes(_bytes(second), Source("test"))
    assert len(_journal(archive)) == 1
    archive.close()
    reopened = Archive(tmp_path / "a")
    try:
        assert _journal(reopened) == []
        assert reopened.counts()["instances"] == 2
    finally:
        reopened.close()


def test_repair_reindexes_a_stored_blob_whose_journal_row_was_left(tmp_path):
    archive = Archive(tmp_path / "a")
    ds = corpus.ct_series(1)[0]
    result = archive.store_bytes(_bytes(ds), Source("test"))
    archive.index._writer.finished_journal.clear()  # as if the process died before deleting it
    archive.close()
    reopened = Archive(tmp_path / "a")
    try:
        assert _journal(reopened) == []
        assert reopened.instances(sop_instance_uids=(result.sop_instance_uid,))
    finally:
        reopened.close()


def test_repair_drops_the_row_of_a_blob_whose_rename_did_not_survive(tmp_path):
    archive = Archive(tmp_path / "a")
    ds = corpus.ct_series(1)[0]
    result = archive.store_bytes(_bytes(ds), Source("test"))
    [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
    archive.index._writer.finished_journal.clear()
    archive.close()
    Path(archive.blobs.local_path(stored.blob_key)).unlink()  # the crash lost the rename
    reopened = Archive(tmp_path / "a")
    try:
        assert reopened.instances(sop_instance_uids=(result.sop_instance_uid,)) == []
        assert reopened.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
        assert _journal(reopened) == []
    finally:
        reopened.close()


def test_failed_folder_sync_is_not_acknowledged_and_leaves_the_journal_row(tmp_path, monkeypatch):
    archive = Archive(tmp_path / "a")
    try:
        def fail(self, key):
            raise StorageFailure("disk gone")

        monkeypatch.setattr(FileBlobStore, "sync_place", fail)
        with pytest.raises(StorageFailure):
            archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
        assert len(_journal(archive)) == 1  # repair decides on the next start
    finally:
        archive.close()


def test_failed_temp_sync_stores_nothing(tmp_path, monkeypatch):
    archive = Archive(tmp_path / "a")
    try:
        def fail(self, temp):
            raise StorageFailure("disk gone")

        monkeypatch.setattr(FileBlobStore, "sync_temp", fail)
        with pytest.raises(StorageFailure):
            archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
        assert archive.counts()["instances"] == 0
        assert list(archive.blobs.iter_keys()) == []
        assert _journal(archive) == []
    finally:
        archive.close()


def test_a_received_file_is_taken_over_not_copied(tmp_path):
    archive = Archive(tmp_path / "a")
    try:
        ds = corpus.ct_series(1)[0]
        received = tmp_path / "a" / "received.dcm"  # same file system as the archive
        received.write_bytes(_bytes(ds))
        inode = received.stat().st_ino
        result = archive.store_received_file(received, Source("test"))
        assert not received.exists()
        [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
        path = archive.instance_path(stored)
        assert path.stat().st_ino == inode
        assert path.read_bytes() == _bytes(ds)
    finally:
        archive.close()


def test_storescu_dataset_arrives_through_the_chunked_file(node, monkeypatch):
    """The node receives C-STORE datasets as files (STORE_RECV_CHUNKED_DATASET) and the
    archive keeps pynetdicom's file: no temp file is left behind either way."""
    from pynetdicom import _config

    from tests.conftest import dcmtk

    assert _config.STORE_RECV_CHUNKED_DATASET is True
    path = node.data_dir.parent / "one.dcm"
    ds = corpus.ct_series(1)[0]
    ds.save_as(path, enforce_file_format=True)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    assert node.archive.instances(sop_instance_uids=(ds.SOPInstanceUID,))
    assert [p for p in (node.data_dir / "blobs" / ".tmp").rglob("*") if p.is_file()] == []


def test_an_index_job_never_hands_its_cursor_to_another_thread(tmp_path):
    # A cursor returned across threads shares its cached statement with the writer;
    # resetting it there while the writer steps it kills the writer (SQLITE_MISUSE).
    archive = Archive(tmp_path / "a")
    try:
        assert archive.index.write(lambda c: c.execute("SELECT 1")) is None
    finally:
        archive.close()


def test_parallel_resends_keep_the_index_writer_alive(tmp_path):
    import threading

    archive = Archive(tmp_path / "a")
    try:
        datasets = corpus.ct_series(24)
        payloads = [_bytes(ds) for ds in datasets]
        errors: list[BaseException] = []

        def resend(mine: list[bytes]) -> None:
            try:
                for _ in range(3):
                    for payload in mine:
                        archive.store_bytes(payload, Source("test"))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=resend, args=(payloads[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        assert archive.index._writer.is_alive()
        assert archive.counts()["instances"] == 24
    finally:
        archive.close()


def test_the_index_writer_outlives_a_failed_batch(tmp_path, monkeypatch):
    from storage import sqlite_index

    archive = Archive(tmp_path / "a")
    try:
        first, second = corpus.ct_series(2)
        archive.store_bytes(_bytes(first), Source("test"))  # leaves a finished journal row
        calls = []

        def broken_once(conn, pks):
            calls.append(pks)
            if len(calls) == 1:
                raise sqlite_index.sqlite3.InterfaceError("bad parameter or other API misuse")
            conn.executemany("DELETE FROM journal WHERE pk = ?", [(pk,) for pk in pks])

        monkeypatch.setattr(sqlite_index, "_delete_journal_rows", broken_once)
        with pytest.raises(StorageFailure):
            archive.store_bytes(_bytes(second), Source("test"))
        assert archive.index._writer.is_alive()
        archive.store_bytes(_bytes(second), Source("test"))
        assert archive.counts()["instances"] == 2
    finally:
        archive.close()
