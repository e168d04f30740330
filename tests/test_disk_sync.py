"""Several fsyncs at once for the calling thread (storage/disk_sync.py, Linux AIO)."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from storage import disk_sync

pytestmark = pytest.mark.skipif(not disk_sync.available(), reason="no kernel AIO syncs on this machine")


@pytest.fixture
def written(tmp_path):
    """A file with unsynced content, and its folder, open."""
    fd = os.open(tmp_path / "content.dcm", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(256 * 1024))
    folder = os.open(tmp_path, os.O_RDONLY)
    yield fd, folder
    os.close(fd)
    os.close(folder)


def test_a_file_and_its_folder_sync_together(written):
    fd, folder = written
    assert disk_sync.sync_together([(fd, True), (folder, False)]) == [None, None]


def test_each_descriptor_is_really_synced_not_read(written):
    # a pipe cannot be synced: os.fsync says EINVAL, and so must an operation that
    # syncs (a read or a no-op of the wrong kind would succeed)
    fd, _ = written
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError) as by_os:
            os.fsync(read_end)
        results = disk_sync.sync_together([(read_end, False), (read_end, True), (fd, True)])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert [r.errno if r else None for r in results] == [by_os.value.errno, by_os.value.errno, None]


def test_a_descriptor_that_cannot_be_synced_fails_alone(written):
    fd, folder = written
    closed = os.dup(fd)
    os.close(closed)
    content, bad, folder_result = disk_sync.sync_together([(fd, True), (closed, True), (folder, False)])
    assert content is None and folder_result is None
    assert isinstance(bad, OSError) and bad.errno == errno.EBADF


def test_more_descriptors_than_one_submission_takes_are_all_synced(written):
    fd, folder = written
    results = disk_sync.sync_together([(fd, True), (folder, False)] * 20)
    assert results == [None] * 40


def test_threads_sync_at_the_same_time(written):
    fd, folder = written
    failures: list = []

    def store_like() -> None:
        for _ in range(30):
            results = disk_sync.sync_together([(fd, True), (folder, False)])
            if results != [None, None]:
                failures.append(results)

    threads = [threading.Thread(target=store_like) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []


def test_without_a_spare_kernel_context_the_syncs_still_run(written, monkeypatch, tmp_path):
    # /proc/sys/fs/aio-max-nr reached: the waiting thread syncs them itself
    fd, folder = written
    closed = os.dup(fd)
    os.close(closed)

    def no_context():
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(disk_sync._contexts, "take", no_context)
    content, bad, folder_result = disk_sync.sync_together([(fd, True), (closed, True), (folder, False)])
    assert content is None and folder_result is None
    assert bad is not None and bad.errno == errno.EBADF
