"""Per-instance metadata cache: derived bytes (a DICOM JSON fragment) kept beside the
archive, one file per blob, so that ``/metadata`` need not parse every instance file on
every request.

The cache is derived data. Each file starts with a header that names what it was made
from (the caller's format version, the blob's size, mtime and inode) and checks its body
(length, CRC-32): an entry that does not match the blob as it is now, or that is damaged,
is ignored and rebuilt. Entries are removed with their blob; losing the whole folder loses
nothing but time. Files are written atomically (temp file in the same folder, rename)
without fsync: after a crash a damaged entry fails its check and is rebuilt.

New entries are written by one background thread (:meth:`MetadataCache.write_later`), so
the request that built them does not wait for file creation; when its queue is full an
entry is simply not written (it is built again next time).
"""
from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable

from .blobs import PLAIN_KEY

log = logging.getLogger("dicomnode.archive")

_MAGIC = b"dicomnode-metadata"


def stamp_of(version: str, st: os.stat_result) -> bytes:
    """What an entry was derived from: the caller's format version and the blob's identity."""
    if not version or any(c.isspace() for c in version):
        raise ValueError(f"metadata cache version {version!r}: one word, no spaces")
    return f"{version} {st.st_size} {st.st_mtime_ns} {st.st_ino}".encode()


class MetadataCache:
    """Cache files under ``root``, named after the blob key (``<key>.json``)."""

    def __init__(self, root: Path, queue_size: int = 10000) -> None:
        self.root = Path(root).resolve()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- background writes
    def write_later(self, key: str, stamp: bytes, body: bytes, still_current: Callable[[], bool]) -> None:
        """Queue ``write``; once written, the entry is removed again unless
        ``still_current()`` (its blob was deleted or replaced meanwhile)."""
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metadata-cache", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((key, stamp, body, still_current))
        except queue.Full:
            pass  # derived data: built again on the next request

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                key, stamp, body, still_current = job
                self.write(key, stamp, body)
                try:
                    current = still_current()
                except OSError:
                    current = False
                if not current:
                    self.remove(key)
            except Exception:
                log.exception("metadata cache write failed")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued entry is written (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def path(self, key: str) -> Path | None:
        if PLAIN_KEY.fullmatch(key):
            return self.root / f"{key}.json"
        path = (self.root / f"{key}.json").resolve()
        return path if self.root in path.parents else None

    def read(self, key: str, stamp: bytes) -> bytes | None:
        """The cached body when it was derived from what ``stamp`` describes and is intact."""
        path = self.path(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        head, sep, body = data.partition(b"\n")
        parts = head.split(b" ")
        if not sep or len(parts) != 7 or parts[0] != _MAGIC or b" ".join(parts[1:5]) != stamp:
            return None
        try:
            length, crc = int(parts[5]), int(parts[6])
        except ValueError:
            return None
        if len(body) != length or zlib.crc32(body) != crc:
            log.warning("metadata cache entry %s is damaged; rebuilding it", key)
            return None
        return body

    def write(self, key: str, stamp: bytes, body: bytes) -> None:
        """Store ``body`` for ``key`` (best effort: a failure only costs a rebuild later)."""
        path = self.path(key)
        if path is None:
            return
        data = b"%s %s %d %d\n%s" % (_MAGIC, stamp, len(body), zlib.crc32(body), body)
        try:
            for attempt in (1, 2):
                try:
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # 0600
                    break
                except FileNotFoundError:  # a delete removed the empty folder meanwhile
                    if attempt == 2:
                        raise
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(temp, path)
            except BaseException:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            log.debug("metadata cache entry %s not written: %s", key, exc)

    def remove(self, key: str) -> None:
        """Forget the entry of ``key`` (its blob is going or gone); empty folders go too."""
        path = self.path(key)
        if path is None:
            return
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not remove metadata cache entry %s: %s", key, exc)
            return
        for parent in (path.parent, path.parent.parent):
            if parent == self.root:
                break
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break
