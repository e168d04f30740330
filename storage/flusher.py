"""Folder fsyncs after an acknowledged store, batched, off the acknowledgement's path.

An instance is acknowledged once its file's content and its temp name are on disk and
its durable journal row names both the final key and that temp file (see
``Archive._commit_overlapped``). The file's final name (a second link to it, see
``FileBlobStore.place``) is made durable later, by this thread: it fsyncs each changed
folder once per batch, however many instances were named into it, and only then removes
the temp names and lets the journal rows go. A crash before that leaves the row and the
temp name, and repair finishes the naming from the temp file.

A batch gathers for ``gather_s`` after its first instance: a scanner's series, one
instance after another, then costs one sync of its folder per batch rather than one per
instance (each is a cache flush of the disk, competing with the syncs acknowledgements
wait for). ``drain`` does not wait for the gathering.

The same thread deletes the files that re-sent instances made obsolete
(``submit_obsolete``), in the same batches: the index rows pointing at the new files
must be on disk first, and one sync of the index serves the whole batch
(``Archive._drop_obsolete_files``), not one per re-sent instance before its
acknowledgement.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dicomnode.archive")


class FolderFlusher:
    """One thread that syncs folders, then removes the temp names and reports the
    journal rows they completed; and deletes the files re-sent instances made obsolete."""

    def __init__(self, sync_folders: Callable[[list[Path]], None], finished: Callable[[int], None],
                 discard_temp: Callable[[Path], None], gather_s: float = 0.02,
                 drop_obsolete: Callable[[list[tuple[str, int | None]]], None] | None = None) -> None:
        self._sync_folders = sync_folders
        self._drop_obsolete = drop_obsolete
        self.gather_s = gather_s
        self._finished = finished
        self._discard_temp = discard_temp
        self._pending: list[tuple[list[Path], int, Path]] = []
        self._obsolete: list[tuple[str, int | None]] = []  # (blob key, its 'delete' journal row)
        self._cond = threading.Condition()
        self._busy = False
        self._hurry = 0  # callers waiting in drain: no gathering
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="folder-flusher", daemon=True)
        self._thread.start()

    def submit(self, folders: list[Path], journal_pk: int, temp: Path) -> None:
        """``temp``: the file's temp name, removed once ``folders`` are synced."""
        with self._cond:
            self._pending.append((folders, journal_pk, temp))
            self._wake_for_first()

    def submit_obsolete(self, key: str, journal_pk: int | None) -> None:
        """Delete blob ``key`` (a re-sent instance's old file) with the next batch, once
        the index is on disk; ``journal_pk``: its 'delete' journal row, let go after."""
        assert self._drop_obsolete is not None, "this flusher was given no way to delete files"
        with self._cond:
            self._obsolete.append((key, journal_pk))
            self._wake_for_first()

    def _wake_for_first(self) -> None:
        if len(self._pending) + len(self._obsolete) == 1:  # later ones join a batch that is gathering: no wake-up
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is synced, and deleted (tests, close)."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._pending and not self._obsolete and not self._busy,
                                           timeout)
            finally:
                self._hurry -= 1

    def close(self) -> None:
        self.drain(timeout=30)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._obsolete or self._closed)
                if not self._pending and not self._obsolete:
                    return
                self._cond.wait_for(lambda: self._closed or self._hurry, self.gather_s)
                batch, self._pending = self._pending, []
                obsolete, self._obsolete = self._obsolete, []
                self._busy = True
            try:
                if batch:
                    self._flush(batch)
                if obsolete:
                    self._drop(obsolete)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _flush(self, batch: list[tuple[list[Path], int, Path]]) -> None:
        try:
            folders = [folder for entry_folders, _, _ in batch for folder in entry_folders]
            self._sync_folders(folders)
        except Exception:
            # the journal rows and temp names stay: repair re-checks those files on the next start
            log.exception("could not sync %d archive folder(s)", len(set(folders)))
            return
        for _, pk, temp in batch:
            try:
                self._discard_temp(temp)
            except OSError as exc:  # the file is safe under its key; the temp name goes with the process's temp folder
                log.warning("could not remove the temp name %s: %s", temp, exc)
            self._finished(pk)

    def _drop(self, obsolete: list[tuple[str, int | None]]) -> None:
        assert self._drop_obsolete is not None
        try:
            self._drop_obsolete(obsolete)
        except Exception:
            # their journal rows stay: repair deletes those files on the next start
            log.exception("could not delete %d obsolete file(s)", len(obsolete))
