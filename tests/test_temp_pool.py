"""Files made ahead for C-STORE receipts (storage/temp_pool.py): a receipt takes an empty
file open for writing; the pool's thread keeps a few ready; close removes them."""
from __future__ import annotations

import os
import time

import pytest

from storage.temp_pool import SUFFIX, TempFilePool
from tests import corpus
from tests.conftest import dcmtk
from tests.support import wait_until


@pytest.fixture
def pool(tmp_path):
    made = TempFilePool(tmp_path, low=2, high=5)
    yield made
    made.close()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_taken_is_empty_writable_and_in_the_folder(pool, tmp_path):
    path, fd = pool.take()
    try:
        assert path.parent == tmp_path and path.name.endswith(SUFFIX)
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"DICM")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"DICM"


def test_files_are_made_ahead_once_one_is_taken(pool, tmp_path):
    assert pool.ready() == []  # no thread, no files, until a receipt asks
    path, fd = pool.take()
    os.close(fd)
    wait_until(lambda: len(pool.ready()) == 5, timeout=10, interval=0.01, what="five files made ahead")
    assert sorted(p for p in tmp_path.iterdir() if p != path) == sorted(pool.ready())


def test_files_taken_are_each_made_once(pool):
    taken = []
    for _ in range(20):  # more than the pool holds: some are made by the taker
        path, fd = pool.take()
        os.close(fd)
        taken.append(path)
    assert len(set(taken)) == 20
    assert not set(taken) & set(pool.ready())


def test_the_pool_tops_up_below_its_low_mark(pool):
    os.close(pool.take()[1])
    wait_until(lambda: len(pool.ready()) == 5, timeout=10, interval=0.01, what="five files made ahead")
    for _ in range(4):
        os.close(pool.take()[1])
    wait_until(lambda: len(pool.ready()) == 5, timeout=10, interval=0.01, what="the pool full again")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_close_removes_the_files_still_ready_and_their_descriptors(tmp_path):
    before = _open_descriptors()
    pool = TempFilePool(tmp_path, low=2, high=5)
    path, fd = pool.take()
    os.close(fd)
    wait_until(lambda: len(pool.ready()) == 5, timeout=10, interval=0.01, what="five files made ahead")
    pool.close()
    assert list(tmp_path.iterdir()) == [path]  # the one taken is its taker's
    assert _open_descriptors() == before
    assert pool.ready() == []


def test_a_folder_that_cannot_take_files_fails_the_take_and_the_pool_recovers(tmp_path):
    folder = tmp_path / "receive"
    folder.mkdir()
    pool = TempFilePool(folder, low=2, high=3)
    pool.RETRY_S = 0.05
    try:
        os.close(pool.take()[1])
        wait_until(lambda: len(pool.ready()) == 3, timeout=10, interval=0.01, what="three files made ahead")
        folder.rename(tmp_path / "moved")
        folder.write_bytes(b"")  # a file where the folder was: nothing can be made in it
        for _, fd in [pool.take() for _ in range(3)]:  # the files made before
            os.close(fd)
        time.sleep(0.2)
        with pytest.raises(OSError):
            pool.take()
        folder.unlink()
        folder.mkdir()
        wait_until(lambda: len(pool.ready()) == 3, timeout=10, interval=0.01, what="the pool to make files again")
    finally:
        pool.close()


def test_c_store_receipts_write_into_files_made_ahead(node, tmp_path, monkeypatch):
    first, *more = corpus.save(corpus.ct_series(3, size=16), tmp_path / "in")
    # the first receipt makes its file itself, and starts the pool
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(first), check=True)
    pool = node.archive.blobs.receipt_files
    wait_until(lambda: len(pool.ready()) == pool.high, timeout=10, interval=0.01, what="the pool full")
    made_ahead = set(pool.ready())
    seen, store_received_file = [], node.archive.store_received_file

    def spy(temp, *args, **kwargs):
        seen.append(temp)
        return store_received_file(temp, *args, **kwargs)

    monkeypatch.setattr(node.archive, "store_received_file", spy)
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, more), check=True)
    assert len(seen) == 2 and set(seen) <= made_ahead
    assert node.archive.counts()["instances"] == 3
    assert node.archive.flusher.drain(30)
    # nothing but files made ahead is left in the receive folder, and those are empty
    left = [p for p in node.archive.receive_folder().iterdir() if p.is_file()]
    assert sorted(left) == sorted(pool.ready())
    assert all(p.stat().st_size == 0 for p in left)
