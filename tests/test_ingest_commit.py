"""The ingest commit overlaps its fsyncs with the index commits; what is acknowledged
is still on disk and in the index, and repair settles what a crash leaves."""
from __future__ import annotations

import time
from collections.abc import Callable
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
    archive.flusher.drain()
    assert len(_journal(archive)) == 1  # the finished row waits for the next transaction
    archive.store_bytes(_bytes(second), Source("test"))
    archive.flusher.drain()
    assert len(_journal(archive)) == 1
    archive.close()
    reopened = Archive(tmp_path / "a")
    try:
        assert _journal(reopened) == []
        assert reopened.counts()["instances"] == 2
    finally:
        reopened.close()


def _store_and_crash_before_the_folder_sync(archive: Archive, ds) -> tuple[str, Path]:
    """Store ``ds`` as if the process died right after the acknowledgement: the rename's
    folder never synced, so its journal row (naming the temp file) is left."""
    archive.flusher.submit = lambda folders, pk, temp: None  # type: ignore[method-assign]
    result = archive.store_bytes(_bytes(ds), Source("test"))
    [(_, key, action, temp)] = _journal(archive)
    assert action == "store" and temp
    archive.close()
    return result.sop_instance_uid, Path(temp)


def test_repair_reindexes_a_stored_blob_whose_journal_row_was_left(tmp_path):
    archive = Archive(tmp_path / "a")
    uid, _ = _store_and_crash_before_the_folder_sync(archive, corpus.ct_series(1)[0])
    reopened = Archive(tmp_path / "a")
    try:
        assert _journal(reopened) == []
        assert reopened.instances(sop_instance_uids=(uid,))
    finally:
        reopened.close()


def _hold_flusher_submissions(archive: Archive) -> tuple[list, Callable[[list, int, Path], None]]:
    """What stores hand the flusher is kept in a list instead; the second value hands
    an entry on to the real flusher."""
    submitted: list = []
    flusher_submit = archive.flusher.submit
    archive.flusher.submit = lambda folders, pk, temp: submitted.append((folders, pk, temp))
    return submitted, flusher_submit


def test_a_stored_file_keeps_its_temp_name_until_the_folder_of_its_key_is_synced(tmp_path):
    # On a file system without a metadata journal a rename could reach the disk half
    # done (the temp name gone, the key's folder not yet written): the file keeps a
    # second name until the folder holding its key is synced.
    archive = Archive(tmp_path / "a")
    try:
        submitted, flusher_submit = _hold_flusher_submissions(archive)
        result = archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
        [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
        key_path = archive.instance_path(stored)
        [(folders, pk, temp)] = submitted
        assert temp.parent == archive.blobs.tmp and temp.samefile(key_path)
        assert key_path.parent in folders

        flusher_submit(folders, pk, temp)
        assert archive.flusher.drain(timeout=30)
        assert not temp.exists()
        assert key_path.stat().st_nlink == 1
    finally:
        archive.close()


def test_a_study_deleted_before_the_flusher_synced_its_folder_leaves_no_temp_name(tmp_path):
    # delete removes a study's emptied folders; the flusher's sync of them comes later
    archive = Archive(tmp_path / "a")
    try:
        submitted, flusher_submit = _hold_flusher_submissions(archive)
        ds = corpus.ct_series(1)[0]
        archive.store_bytes(_bytes(ds), Source("test"))
        assert archive.delete(ds.StudyInstanceUID) == 1
        [(folders, pk, temp)] = submitted
        assert not folders[0].exists()

        flusher_submit(folders, pk, temp)
        assert archive.flusher.drain(timeout=30)
        assert not temp.exists()  # the deleted instance's content does not live on under it
        archive.index.write(lambda conn: None)  # a finished journal row goes with the next transaction
        assert pk not in [row[0] for row in _journal(archive)]
    finally:
        archive.close()


def test_a_temp_name_that_cannot_be_removed_does_not_stop_the_flusher(tmp_path):
    from storage.flusher import FolderFlusher

    finished, tried = [], []

    def discard(temp):
        tried.append(temp)
        if temp.name == "stuck.part":
            raise PermissionError(13, "Permission denied")

    flusher = FolderFlusher(lambda folders: None, finished.append, discard)
    try:
        flusher.submit([tmp_path], 1, tmp_path / "stuck.part")
        assert flusher.drain(timeout=10)
        flusher.submit([tmp_path], 2, tmp_path / "fine.part")
        assert flusher.drain(timeout=10)
    finally:
        flusher.close()
    assert [t.name for t in tried] == ["stuck.part", "fine.part"]
    assert finished == [1, 2]  # the keys are durable: the journal rows go all the same


def test_instances_given_to_the_flusher_within_its_gathering_time_share_one_folder_sync(tmp_path):
    from storage.flusher import FolderFlusher

    synced: list[list] = []
    finished: list[int] = []
    flusher = FolderFlusher(synced.append, finished.append, lambda temp: None, gather_s=60)
    try:
        flusher.submit([tmp_path / "series"], 1, tmp_path / "1.part")
        time.sleep(0.2)  # the flusher has woken for the first
        for pk in range(2, 6):
            flusher.submit([tmp_path / "series"], pk, tmp_path / f"{pk}.part")
        assert finished == []  # still gathering
        assert flusher.drain(timeout=10)  # a drain does not wait out the gathering time
    finally:
        flusher.close()
    assert synced == [[tmp_path / "series"] * 5]  # one batch (sync_folders syncs each folder once)
    assert finished == [1, 2, 3, 4, 5]


def _context_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status:
        return sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread counts from Linux /proc")
def test_instances_given_to_a_gathering_flusher_do_not_wake_it(tmp_path):
    # each wake-up is a hand-over of the interpreter lock by the thread that is storing
    from storage.flusher import FolderFlusher

    flusher = FolderFlusher(lambda folders: None, lambda pk: None, lambda temp: None, gather_s=60)
    try:
        flusher.submit([tmp_path / "series"], 1, tmp_path / "1.part")
        time.sleep(0.2)  # the flusher has woken for the first, and gathers
        before = _context_switches(flusher._thread.native_id)
        for pk in range(2, 52):  # one after another, as a modality sends them
            flusher.submit([tmp_path / "series"], pk, tmp_path / f"{pk}.part")
            time.sleep(0.002)
        assert _context_switches(flusher._thread.native_id) - before < 5
    finally:
        flusher.close()


def test_repair_finishes_a_rename_that_did_not_survive(tmp_path):
    archive = Archive(tmp_path / "a")
    ds = corpus.ct_series(1)[0]
    uid, temp = _store_and_crash_before_the_folder_sync(archive, ds)
    key_path = next((tmp_path / "a" / "blobs").rglob("*.dcm"))
    temp.parent.mkdir(parents=True, exist_ok=True)
    key_path.rename(temp)  # what the disk holds when the crash lost the rename
    reopened = Archive(tmp_path / "a")
    try:
        [stored] = reopened.instances(sop_instance_uids=(uid,))
        assert reopened.instance_path(stored).read_bytes() == _bytes(ds)
        assert not temp.exists()
        assert _journal(reopened) == []
    finally:
        reopened.close()


def test_repair_drops_the_row_of_a_blob_that_is_nowhere(tmp_path):
    archive = Archive(tmp_path / "a")
    uid, temp = _store_and_crash_before_the_folder_sync(archive, corpus.ct_series(1)[0])
    next((tmp_path / "a" / "blobs").rglob("*.dcm")).unlink()  # lost, and no temp file either
    assert not temp.exists()
    reopened = Archive(tmp_path / "a")
    try:
        assert reopened.instances(sop_instance_uids=(uid,)) == []
        assert reopened.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
        assert _journal(reopened) == []
    finally:
        reopened.close()


def test_repair_drops_an_incomplete_temp_file_that_was_never_acknowledged(tmp_path):
    archive = Archive(tmp_path / "a")
    ds = corpus.ct_series(1)[0]
    uid, temp = _store_and_crash_before_the_folder_sync(archive, ds)
    key_path = next((tmp_path / "a" / "blobs").rglob("*.dcm"))
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(_bytes(ds)[:-100])  # the content never reached the disk whole
    key_path.unlink()
    reopened = Archive(tmp_path / "a")
    try:
        assert reopened.instances(sop_instance_uids=(uid,)) == []
        assert not temp.exists()
        assert list(reopened.blobs.iter_keys()) == []
        assert _journal(reopened) == []
    finally:
        reopened.close()


def test_a_failed_folder_sync_after_the_acknowledgement_leaves_the_journal_row(tmp_path):
    archive = Archive(tmp_path / "a")
    try:
        def fail(folders):
            raise StorageFailure("disk gone")

        archive.flusher._sync_folders = fail
        archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
        archive.flusher.drain()
        assert len(_journal(archive)) == 1  # repair re-checks the rename on the next start
    finally:
        archive.close()


@pytest.fixture
def threads_only(monkeypatch):
    """Archives opened from now on sync on threads, as where the kernel cannot sync for
    the storing thread (storage/disk_sync.py)."""
    from storage import disk_sync

    monkeypatch.setattr(disk_sync, "available", lambda: False)


def test_an_archive_syncs_for_the_storing_thread_where_the_kernel_can(tmp_path):
    from storage import disk_sync

    archive = Archive(tmp_path / "a")
    try:
        assert archive.syncs_together is disk_sync.available()
    finally:
        archive.close()


def test_without_kernel_syncs_a_stored_instance_is_in_place_and_indexed(tmp_path, threads_only):
    archive = Archive(tmp_path / "a")
    try:
        assert not archive.syncs_together
        ds = corpus.ct_series(1)[0]
        result = archive.store_bytes(_bytes(ds), Source("test"))
        [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
        assert archive.instance_path(stored).read_bytes() == _bytes(ds)
        archive.flusher.drain()
        assert list(archive.blobs.tmp.iterdir()) == []
    finally:
        archive.close()


@pytest.fixture
def together_archive(tmp_path):
    from storage import disk_sync

    if not disk_sync.available():
        pytest.skip("no kernel AIO syncs on this machine")
    archive = Archive(tmp_path / "a")
    yield archive
    archive.close()


def _spy_on_kernel_syncs(monkeypatch, on_start) -> None:
    """Call ``on_start(paths)`` as each batch of kernel syncs begins; ``on_start`` may
    return {position: OSError} to report instead of those syncs' results."""
    import os

    from storage import disk_sync

    real_start = disk_sync.start

    def start(targets):
        failed = on_start([os.readlink(f"/proc/self/fd/{fd}") for fd, _ in targets]) or {}
        pending = real_start(targets)
        real_wait = pending.wait

        def wait():
            results = real_wait()
            for position, exc in failed.items():
                results[position] = exc
            return results

        pending.wait = wait
        return pending

    monkeypatch.setattr(disk_sync, "start", start)


def test_the_journal_row_is_committed_before_the_syncs_that_make_it_durable(together_archive, monkeypatch):
    archive = together_archive
    wal = str(archive.index.path) + "-wal"
    synced: list[str] = []
    journal_when_wal_synced: list = []

    def on_start(paths):
        synced.extend(paths)
        if wal in paths:
            journal_when_wal_synced.append(_journal(archive))

    _spy_on_kernel_syncs(monkeypatch, on_start)
    archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
    [[(_, key, action, temp)]] = journal_when_wal_synced  # the row naming the file, already committed
    assert action == "store"
    assert sorted(synced) == sorted([temp, str(archive.blobs.tmp), wal])  # each synced once


@pytest.mark.parametrize("failing", ["content", "temp folder", "index"])
def test_a_failed_sync_stores_nothing(together_archive, monkeypatch, failing):
    archive = together_archive

    def which(path: str) -> str:
        if path == str(archive.blobs.tmp):
            return "temp folder"
        return "index" if path.endswith("-wal") else "content"

    _spy_on_kernel_syncs(monkeypatch, lambda paths: {
        position: OSError(5, "Input/output error") for position, path in enumerate(paths) if which(path) == failing
    })
    with pytest.raises(StorageFailure, match="Input/output error"):
        archive.store_bytes(_bytes(corpus.ct_series(1)[0]), Source("test"))
    assert archive.counts()["instances"] == 0
    assert list(archive.blobs.iter_keys()) == []
    assert _journal(archive) == []
    assert list(archive.blobs.tmp.iterdir()) == []


@pytest.mark.parametrize("step", ["sync_temp", "sync_temp_folder"])
def test_failed_temp_sync_stores_nothing(tmp_path, monkeypatch, step, threads_only):
    archive = Archive(tmp_path / "a")
    try:
        def fail(*args):
            raise StorageFailure("disk gone")

        monkeypatch.setattr(FileBlobStore, step, fail)
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
    assert node.archive.flusher.drain(timeout=30)  # the temp name goes once the key's folder is synced
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
        archive.store_bytes(_bytes(first), Source("test"))
        archive.flusher.drain()  # leaves a finished journal row for the next transaction
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


def test_a_durable_index_write_returns_only_after_the_wal_is_synced_and_a_visible_one_does_not_wait(
    tmp_path, monkeypatch
):
    import os
    import threading

    from storage import sqlite_index

    archive = Archive(tmp_path / "a")
    try:
        archive.index.write(lambda c: c.execute("SELECT 1"))  # the WAL file exists
        release = threading.Event()
        synced: list[str] = []
        real_fsync = os.fdatasync

        def slow_fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith("-wal"):
                release.wait(10)
                synced.append(path)
            real_fsync(fd)

        monkeypatch.setattr(sqlite_index.os, "fdatasync", slow_fsync)
        durable = archive.index.submit(lambda c: c.execute("INSERT INTO journal (blob_key, action, created_at)"
                                                           " VALUES ('k', 'delete', 0)").lastrowid)
        visible = archive.index.submit(lambda c: c.execute("SELECT count(*) FROM journal").fetchone()[0],
                                       durable=False)
        assert visible.result(timeout=10) >= 0  # not held up by the sync in progress
        assert not durable.done()
        release.set()
        assert durable.result(timeout=10) > 0
        assert synced and synced[0].endswith("-wal")
    finally:
        archive.close()


def test_a_c_store_opens_its_received_file_once_and_removes_its_temp_name_once(node, monkeypatch):
    """Per C-STORE the received file is opened once more after it is written (its size,
    its header and its content sync through one descriptor), and its temp name is
    removed once, by the archive once the key's folder is synced (pynetdicom removes
    nothing)."""
    import builtins
    import os

    from tests.conftest import dcmtk

    opened, buffered, unlinked = [], [], []
    real_open, real_builtin_open, real_unlink = os.open, builtins.open, os.unlink

    def spy_open(path, flags, *args, **kwargs):
        if str(path).endswith(".part") and not flags & os.O_CREAT:
            opened.append(path)
        return real_open(path, flags, *args, **kwargs)

    def spy_builtin_open(file, *args, **kwargs):
        if str(file).endswith(".part"):
            buffered.append(file)
        return real_builtin_open(file, *args, **kwargs)

    def spy_unlink(path, *args, **kwargs):
        if str(path).endswith(".part"):
            unlinked.append(path)
        return real_unlink(path, *args, **kwargs)

    files = []
    for n, ds in enumerate(corpus.ct_series(3)):
        files.append(node.data_dir.parent / f"{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_builtin_open)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, files), check=True)
    assert node.archive.flusher.drain(timeout=30)
    monkeypatch.undo()
    assert node.archive.counts()["instances"] == 3
    assert len(opened) == 3 and len(set(opened)) == 3
    assert buffered == []
    assert sorted(map(str, unlinked)) == sorted(map(str, opened))
    assert [p for p in (node.data_dir / "blobs" / ".tmp").rglob("*") if p.is_file()] == []


def test_a_refused_c_store_leaves_no_received_file(node):
    from tests.conftest import dcmtk

    path = node.data_dir.parent / "bad.dcm"
    ds = corpus.ct_series(1)[0]
    del ds.StudyInstanceUID  # the archive refuses it
    ds.save_as(path, enforce_file_format=True)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path))
    assert node.archive.counts()["instances"] == 0
    assert [p for p in (node.data_dir / "blobs" / ".tmp").rglob("*") if p.is_file()] == []


def test_a_received_file_on_another_file_system_is_copied_and_then_gone(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second file system")
    archive = Archive(tmp_path / "a")
    received = shm / f"dicomnode-test-{tmp_path.name}.dcm"
    try:
        ds = corpus.ct_series(1)[0]
        received.write_bytes(_bytes(ds))
        result = archive.store_received_file(received, Source("test"))
        assert not received.exists()  # the caller gave it up
        [stored] = archive.instances(sop_instance_uids=(result.sop_instance_uid,))
        assert archive.instance_path(stored).read_bytes() == _bytes(ds)
    finally:
        received.unlink(missing_ok=True)
        archive.close()


# ------------------------------------------------------------------ folders made by other stores


def _temp_file(blobs: FileBlobStore, data: bytes = b"x") -> Path:
    fh, temp = blobs.new_temp()
    with fh:
        fh.write(data)
    return temp


def _synced(monkeypatch) -> list[Path]:
    """The folders fsynced from now on (the blob store's own fsync, observed)."""
    import storage.blobs as blobs_module

    synced: list[Path] = []
    real = blobs_module._fsync_dir

    def spy(folder):
        synced.append(Path(folder))
        real(folder)

    monkeypatch.setattr(blobs_module, "_fsync_dir", spy)
    return synced


def test_a_rename_into_a_folder_another_store_just_made_makes_that_folders_entry_durable(tmp_path, monkeypatch):
    # store A makes the series folder and renames into it; store B, renaming into the
    # same folder, is synced first (its journal row would go): the folder's own entry,
    # not synced yet by A, must be synced with B's rename
    blobs = FileBlobStore(tmp_path / "blobs")
    blobs.place(_temp_file(blobs), "1.2.3/1.2.3.4/a.dcm")
    synced = _synced(monkeypatch)
    b_folders = blobs.place(_temp_file(blobs), "1.2.3/1.2.3.4/b.dcm")
    blobs.sync_folders(b_folders, changed_only=True)
    root = tmp_path.resolve() / "blobs"
    assert synced == [root / "1.2.3" / "1.2.3.4", root / "1.2.3", root]


def test_folders_unchanged_since_they_were_synced_are_not_synced_again(tmp_path, monkeypatch):
    import os

    blobs = FileBlobStore(tmp_path / "blobs")
    root = tmp_path.resolve() / "blobs"
    blobs.sync_folders(blobs.place(_temp_file(blobs), "1.2.3/1.2.3.4/a.dcm"), changed_only=True)
    for folder in (root / "1.2.3", root):  # their last change now more than a second ago
        os.utime(folder, ns=(os.stat(folder).st_atime_ns, os.stat(folder).st_mtime_ns - 5_000_000_000))
    blobs.sync_folders([root / "1.2.3", root], changed_only=True)
    synced = _synced(monkeypatch)
    blobs.sync_folders(blobs.place(_temp_file(blobs), "1.2.3/1.2.3.4/b.dcm"), changed_only=True)
    assert synced == [root / "1.2.3" / "1.2.3.4"]


def test_a_folder_changed_within_the_last_second_is_synced_every_time(tmp_path, monkeypatch):
    # timestamps are coarse: a change in the same tick as the last sync would not show
    blobs = FileBlobStore(tmp_path / "blobs")
    root = tmp_path.resolve() / "blobs"
    folders = blobs.place(_temp_file(blobs), "1.2.3/1.2.3.4/a.dcm")
    blobs.sync_folders(folders, changed_only=True)
    synced = _synced(monkeypatch)
    blobs.sync_folders(folders, changed_only=True)
    assert synced == [root / "1.2.3" / "1.2.3.4", root / "1.2.3", root]


def test_placing_a_key_another_store_wrote_meanwhile_fails_and_leaves_that_file(tmp_path):
    blobs = FileBlobStore(tmp_path / "blobs")
    try:
        fh, temp = blobs.new_temp()
        with fh:
            fh.write(b"mine")
        theirs = blobs.local_path("1.2/3.4/5.6.dcm")
        theirs.parent.mkdir(parents=True)
        theirs.write_bytes(b"theirs")  # another process named the same new key a moment ago
        with pytest.raises(StorageFailure, match="at the same time"):
            blobs.place(temp, "1.2/3.4/5.6.dcm")
        assert theirs.read_bytes() == b"theirs"
        assert temp.read_bytes() == b"mine"  # still the caller's, to discard
    finally:
        blobs.close()


def test_a_file_system_without_hard_links_gets_the_file_renamed(tmp_path, monkeypatch):
    import errno
    import os

    blobs = FileBlobStore(tmp_path / "blobs")
    try:
        fh, temp = blobs.new_temp()
        with fh:
            fh.write(b"data")

        def no_links(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
        blobs.place(temp, "1.2/3.4/5.6.dcm")
        assert blobs.local_path("1.2/3.4/5.6.dcm").read_bytes() == b"data"
        assert not temp.exists()
        blobs.discard_temp(temp)  # what the flusher then does: nothing left to remove
    finally:
        blobs.close()


@pytest.fixture
def slow_flusher_archive(tmp_path):
    """An archive whose flusher gathers a batch for 30 s (until ``drain``): what is done
    before a store returns is the acknowledgement's, the rest the flusher's."""
    archive = Archive(tmp_path / "a")
    archive.flusher.gather_s = 30
    yield archive
    archive.close()


def _stored_file(archive: Archive, sop_uid: str) -> Path:
    [stored] = archive.index.instances(None, None, (sop_uid,))
    return archive.instance_path(stored)


def test_a_resent_instance_is_acknowledged_before_its_old_file_goes(slow_flusher_archive):
    archive = slow_flusher_archive
    [ds] = corpus.ct_series(1)
    archive.store_bytes(_bytes(ds), Source("test"))
    assert archive.flusher.drain(10)
    old = _stored_file(archive, ds.SOPInstanceUID)
    result = archive.store_bytes(_bytes(ds), Source("test"))
    new = _stored_file(archive, ds.SOPInstanceUID)
    assert result.replaced and new != old
    assert old.exists()  # its 'delete' journal row waits with it for the flusher
    assert [action for _, _, action, _ in _journal(archive)].count("delete") == 1
    assert archive.flusher.drain(10)
    assert not old.exists() and new.exists()


def test_the_old_files_of_a_batch_of_resends_cost_one_sync_of_the_index(slow_flusher_archive, monkeypatch):
    archive = slow_flusher_archive
    datasets = corpus.ct_series(5)
    for ds in datasets:
        archive.store_bytes(_bytes(ds), Source("test"))
    assert archive.flusher.drain(10)
    old = [_stored_file(archive, ds.SOPInstanceUID) for ds in datasets]
    syncs = []
    real_sync = archive.index.journal_sync
    monkeypatch.setattr(archive.index, "journal_sync", lambda pk: (syncs.append(pk), real_sync(pk)))
    for ds in datasets:
        archive.store_bytes(_bytes(ds), Source("test"))
    assert syncs == []  # none before an acknowledgement
    assert archive.flusher.drain(10)
    assert len(syncs) == 1
    assert not any(path.exists() for path in old)
    assert archive.counts()["instances"] == 5


def test_old_files_a_crash_left_are_deleted_by_repair(tmp_path):
    archive = Archive(tmp_path / "a")
    [ds] = corpus.ct_series(1)
    archive.store_bytes(_bytes(ds), Source("test"))
    assert archive.flusher.drain(10)
    old = _stored_file(archive, ds.SOPInstanceUID)
    archive.flusher.gather_s = 30
    archive.flusher._drop_obsolete = lambda obsolete: None  # the process dies before the flusher deletes
    archive.store_bytes(_bytes(ds), Source("test"))
    archive.close()
    assert old.exists()
    reopened = Archive(tmp_path / "a")
    try:
        assert not old.exists()
        assert _stored_file(reopened, ds.SOPInstanceUID).exists()
        assert "delete" not in [action for _, _, action, _ in _journal(reopened)]
    finally:
        reopened.close()
