"""The index writer takes SQLite's write lock with its own short waits while another
process (a worker, ``dicomnode import``) holds it (storage/sqlite_index.py)."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from storage.sqlite_index import _BUSY_TIMEOUT_MS, SQLiteIndex, _begin_immediate


@pytest.fixture
def db(tmp_path):
    index = SQLiteIndex(tmp_path / "index.sqlite")
    index.close()
    return tmp_path / "index.sqlite"


def _connect(path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def test_a_write_begins_once_another_connection_releases_the_write_lock(db):
    other, mine = _connect(db), _connect(db)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO journal (blob_key, action, created_at) VALUES ('k', 'store', 0)")
    threading.Timer(0.2, lambda: other.execute("COMMIT")).start()
    _begin_immediate(mine)
    assert mine.in_transaction
    assert mine.execute("SELECT count(*) FROM journal").fetchone() == (1,)  # after the other's commit
    mine.execute("ROLLBACK")


def test_a_write_lock_never_released_fails_after_the_timeout_as_database_is_locked(db):
    other, mine = _connect(db), _connect(db)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _begin_immediate(mine, timeout_ms=100)
    assert not mine.in_transaction
    other.execute("ROLLBACK")


def test_after_beginning_the_connection_keeps_sqlites_own_busy_timeout(db):
    other, mine = _connect(db), _connect(db)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.1, lambda: other.execute("ROLLBACK")).start()
    _begin_immediate(mine)
    assert mine.execute("PRAGMA busy_timeout").fetchone() == (_BUSY_TIMEOUT_MS,)
    mine.execute("ROLLBACK")


def test_an_error_other_than_a_busy_lock_is_raised_at_once(db):
    conn = _connect(db)
    conn.execute("BEGIN")
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        _begin_immediate(conn)
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (_BUSY_TIMEOUT_MS,)
    conn.execute("ROLLBACK")
