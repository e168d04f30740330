"""Folder fsyncs after an acknowledged store, batched, off the acknowledgement's path.

An instance is acknowledged once its file's content and its temp name are on disk and
its durable journal row names both the final key and that temp file (see
``Archive._commit_overlapped``). The rename to the final key is made durable later, by
this thread: it fsyncs each changed folder once per batch, however many instances were
renamed into it, and only then lets the journal row go. A crash before that leaves the
row, and repair finishes the rename from the temp file.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dicomnode.archive")


class FolderFlusher:
    """One thread that syncs folders, then reports the journal rows they completed."""

    def __init__(self, sync_folders: Callable[[list[Path]], None], finished: Callable[[int], None]) -> None:
        self._sync_folders = sync_folders
        self._finished = finished
        self._pending: list[tuple[list[Path], int]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="folder-flusher", daemon=True)
        self._thread.start()

    def submit(self, folders: list[Path], journal_pk: int) -> None:
        with self._cond:
            self._pending.append((folders, journal_pk))
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is synced (tests, close)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        self.drain(timeout=30)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                folders = [folder for entry_folders, _ in batch for folder in entry_folders]
                self._sync_folders(folders)
            except Exception:
                # the journal rows stay: repair re-checks those renames on the next start
                log.exception("could not sync %d archive folder(s)", len(set(folders)))
            else:
                for _, pk in batch:
                    self._finished(pk)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
