"""Who runs an index write (storage/sqlite_index.py): a caller that would only wait for
an idle writer runs its job itself, on the one writer connection; anything given while
jobs are queued or running waits its turn on the writer thread, in order."""
from __future__ import annotations

import threading

import pytest

from storage import StorageFailure
from storage.sqlite_index import SQLiteIndex


@pytest.fixture
def index(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    yield index
    index.close()


def _thread_and_row(conn):
    return threading.get_ident(), conn.execute(
        "INSERT INTO journal (blob_key, action, created_at) VALUES ('k', 'store', 0)").lastrowid


def test_a_write_to_an_idle_writer_runs_on_the_calling_thread(index):
    thread, pk = index.write(_thread_and_row)
    assert thread == threading.get_ident()
    assert index.journal_entries()[0][0] == pk


def test_a_job_given_here_while_the_writer_is_busy_runs_after_it_on_the_writer_thread(index):
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(conn):
        started.set()
        release.wait(10)
        order.append("first")
        return threading.get_ident()

    first = index.submit(slow)
    assert started.wait(10)
    second = index.submit(lambda conn: order.append("second") or threading.get_ident(), here=True)
    assert not second.done()  # not run beside the job in progress
    release.set()
    writer_thread = first.result(timeout=10)
    assert second.result(timeout=10) == writer_thread != threading.get_ident()
    assert order == ["first", "second"]


def test_jobs_given_without_here_run_on_the_writer_thread(index):
    thread, _ = index.submit(_thread_and_row).result(timeout=10)
    assert thread != threading.get_ident()


def test_a_failed_job_run_on_the_calling_thread_fails_alone_and_the_next_write_goes_through(index):
    def broken(conn):
        conn.execute("INSERT INTO journal (blob_key, action, created_at) VALUES ('k', 'bogus', 0)")

    with pytest.raises(Exception, match="CHECK constraint"):
        index.write(broken)
    assert index.journal_entries() == []  # the failed job's row was rolled back
    _, pk = index.write(_thread_and_row)
    assert [row[0] for row in index.journal_entries()] == [pk]


def test_a_batch_that_cannot_begin_fails_its_job_on_the_calling_thread_too(index, monkeypatch):
    from storage import sqlite_index

    def locked(conn, timeout_ms=0):
        raise sqlite_index.sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(sqlite_index, "_begin_immediate", locked)
    with pytest.raises(StorageFailure, match="index unavailable"):
        index.write(_thread_and_row)
    monkeypatch.undo()
    assert index.write(_thread_and_row)[1] > 0


def test_a_threads_jobs_run_in_the_order_it_gave_them_whoever_runs_them(index):
    seen: list[int] = []
    futures = [index.submit(lambda conn, n=n: seen.append(n), durable=False, here=n % 2 == 1)
               for n in range(400)]
    for future in futures:
        future.result(timeout=10)
    assert seen == list(range(400))
