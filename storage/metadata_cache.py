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

:class:`MetadataPrefill` builds the entries of newly stored instances ahead of the first
request: one low-priority thread fed by the archive's events, so that the first
``/metadata`` after a study arrives is served from the cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pydicom

from .blobs import PLAIN_KEY
from .events import InstanceStored, StudyStable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from .archive import Archive
    from .sqlite_index import StoredInstance

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
        self._readers = 0

    # -- requests being served (the prefill stands back meanwhile)
    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around a request that reads (and, on misses, builds) entries."""
        with self._lock:
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1

    @property
    def being_read(self) -> bool:
        return self._readers > 0

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


# --------------------------------------------------------------------------- prefill


class MetadataPrefill:
    """Builds the cache entries of newly stored instances in the background.

    Subscribers of the archive's events (:meth:`subscribe`) only note what arrived (a dict
    insert under a lock: the emitting ingest thread never waits for parsing). One daemon
    thread, at the lowest CPU priority, takes the noted instances series by series, finds
    their blobs in the index with one query per batch and writes each missing entry the
    way :meth:`Archive.instance_metadata` would (same stamp, same check), so a request
    finds it warm. Several events for one series coalesce into one batch.

    It stays out of the way of ingest and of requests: while instances keep arriving or
    requests are being served (``archive.foreground``) it works at most ``busy_share``
    of the time (it sleeps the rest, so those threads get the GIL and the cores); once
    all has been quiet for ``quiet_s`` it runs flat out. At most
    ``max_pending`` instances are remembered: beyond that new ones are not prefilled (the
    ``StudyStable`` sweep or the first request builds them). Entries are derived data:
    losing a pending list (crash, shutdown) only costs a slower first request, and a blob
    deleted or replaced while its entry was built has the entry removed again.
    """

    def __init__(self, archive: "Archive", version: str,
                 build: Callable[["StoredInstance", "Dataset"], bytes], *,
                 max_pending: int = 50000, quiet_s: float = 0.1, busy_share: float = 0.05,
                 batch: int = 200, max_yield_s: float = 5.0) -> None:
        stamp_of(version, os.stat_result((0,) * 10))  # refuse a bad version now, not in the thread
        self.archive = archive
        self.version = version
        self.build = build
        self.max_pending = max_pending
        self.quiet_s = quiet_s
        self.busy_share = busy_share
        self.batch = batch
        self.max_yield_s = max_yield_s
        # (study, series) -> sop uids (None: every instance of the study, a sweep)
        self._pending: OrderedDict[tuple[str, str | None], set[str] | None] = OrderedDict()
        self._count = 0
        self._busy = False
        self._hurry = 0
        self._last_event = 0.0
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self.filled = 0  # entries written (tests, metrics)
        self.dropped = 0  # instances not noted because max_pending was reached

    # -- wiring
    def subscribe(self) -> "MetadataPrefill":
        events = self.archive.events
        self._unsubscribe = [events.subscribe(InstanceStored, self.on_stored),
                             events.subscribe(StudyStable, self.on_stable)]
        return self

    def on_stored(self, event: InstanceStored) -> None:
        result = event.result
        self._note((result.study_uid, result.series_uid), result.sop_instance_uid)

    def on_stable(self, event: StudyStable) -> None:
        """A stable study gets a sweep: any instance still without an entry gets one."""
        self._note((event.study_uid, None), None)

    def _note(self, where: tuple[str, str | None], sop_uid: str | None) -> None:
        with self._cond:
            if self._closed:
                return
            self._last_event = time.monotonic()
            if sop_uid is None:
                self._pending.setdefault(where, None)
            else:
                sops = self._pending.get(where, set())
                if sops is None or sop_uid in sops:
                    return
                if self._count >= self.max_pending:
                    self.dropped += 1
                    return
                sops.add(sop_uid)
                self._pending[where] = sops
                self._count += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metadata-prefill", daemon=True)
                self._thread.start()
            self._cond.notify()

    # -- control
    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every noted instance has its entry (throttling off meanwhile);
        False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                while self._pending or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._hurry -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop (pending work is forgotten: it is only derived data) and unsubscribe."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._count = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the worker
    def _run(self) -> None:
        try:  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                where, sops = self._pending.popitem(last=False)
                if sops is not None and len(sops) > self.batch:  # the rest waits its turn
                    rest = set(list(sops)[self.batch:])
                    sops -= rest
                    self._pending[where] = rest
                    self._pending.move_to_end(where, last=False)
                self._count -= len(sops) if sops is not None else 0
                self._busy = True
            try:
                self._fill_batch(where, sops)
            except Exception:
                log.exception("metadata prefill of %s failed", where)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _fill_batch(self, where: tuple[str, str | None], sops: set[str] | None) -> None:
        study, series = where
        stored = self.archive.instances(study, series, tuple(sorted(sops)) if sops is not None else None)
        for item in stored:
            if self._closed:
                return
            started = time.monotonic()
            try:
                if self.fill(item):
                    self.filled += 1
            except Exception as exc:  # a damaged file: the request will say so
                log.debug("metadata prefill of %s skipped: %s", item.sop_instance_uid, exc)
            self._throttle(time.monotonic() - started)

    def _throttle(self, spent: float) -> None:
        """While ingest is busy, sleep so that this thread works ``busy_share`` of the time;
        while a request reads the cache, wait (up to ``max_yield_s``) for it to finish: it
        builds what it misses itself, and would otherwise compete with this thread."""
        if self._hurry or not spent:
            return
        cache = self.archive.metadata_cache
        if cache.being_read:
            deadline = time.monotonic() + self.max_yield_s
            while cache.being_read and not self._closed and not self._hurry and time.monotonic() < deadline:
                time.sleep(0.01)
        elif time.monotonic() - self._last_event < self.quiet_s or self.archive.foreground.busy(self.quiet_s):
            time.sleep(spent * (1 - self.busy_share) / self.busy_share)
        else:
            time.sleep(0)  # let any other thread have the GIL between instances

    def fill(self, item: "StoredInstance") -> bool:
        """Write ``item``'s entry unless a current one exists; True if written."""
        path = self.archive.instance_path(item)
        if path is None:  # not a local file store: nothing to tell a stale entry by
            return False
        cache = self.archive.metadata_cache
        key = item.blob_key
        try:
            if cache.read(key, stamp_of(self.version, os.stat(path))) is not None:
                return False
            with open(path, "rb") as fh:
                stamp = stamp_of(self.version, os.fstat(fh.fileno()))
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except FileNotFoundError:  # deleted meanwhile
            return False
        body = self.build(item, ds)
        cache.write(key, stamp, body)
        # as in write_later: no entry may outlive (or misdescribe) the blob it came from
        try:
            current = stamp_of(self.version, os.stat(path)) == stamp
        except OSError:
            current = False
        if not current:
            cache.remove(key)
            return False
        return True
