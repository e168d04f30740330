"""The archive service: the only code that writes instances and the index.

Every way in (C-STORE, STOW-RS, vendor uploads, the inbox, ``dicomnode import``) calls
:meth:`Archive.store_bytes`, :meth:`Archive.store_stream`, :meth:`Archive.store_file` or
:meth:`Archive.store_temp`, which all end in :meth:`Archive._ingest`: parse once, validate,
write the file atomically (temp file, fsync, linked to its key), index it, fire ``instance stored``.
When one of them returns, the instance is on disk and in the index. STOW-RS runs the
same path in two halves (:meth:`Archive.prepare_temp` as each part arrives,
:meth:`Archive.store_prepared` once the whole body is in).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AllStoragePresentationContexts

from . import disk_sync
from .activity import Foreground
from .attributes import BY_KEYWORD, COLUMNS_BY_LEVEL, LEVEL_RANK, UNIQUE_KEY, normalize_date, normalize_time
from .blobs import BlobStore, FileBlobStore
from .errors import (
    ArchiveError, Conflict, InvalidInstance, InvalidQuery, NotDicom, NotFound, StorageFailure, StudyMismatch,
    UnsupportedSOPClass,
)
from .events import EventBus, InstanceStored, StudyStable
from .flusher import FolderFlusher
from .header import read_header
from .identity import IdentityStore
from .metadata_cache import MetadataCache, stamp_of
from .metrics import Metrics
from .query import Query, compile_query, row_to_values
from .schema import MIGRATION_SETS
from .sqlite_index import InstanceRecord, SQLiteIndex, StoredInstance, UpsertOutcome
from .uids import generate_uid, require_uid
from .workitems import WorkitemStore

log = logging.getLogger("dicomnode.archive")

STORAGE_SOP_CLASSES: frozenset[str] = frozenset(cx.abstract_syntax for cx in AllStoragePresentationContexts)
_COPY_CHUNK = 1 << 20
_DEFER_SIZE = 4096  # values larger than this are skipped, not loaded, while indexing
_BATCH = 64  # instances stored together by store_prepared_all
# a temp file's name sync begun before its content is complete: in the kernel
# (storage/disk_sync.py) or on the archive's pool
BegunNameSync = Future[None] | disk_sync.Pending


@dataclass(frozen=True)
class Source:
    """Who handed the archive an instance: the calling AE over DIMSE, an HTTP client,
    the inbox or the import command; and the organization it stores for."""

    kind: str  # dimse, http, inbox, import
    name: str = ""
    address: str = ""
    organization: str = "local"

    def __str__(self) -> str:
        where = f"@{self.address}" if self.address else ""
        return f"{self.kind}:{self.name}{where}"


@dataclass(frozen=True)
class StoreResult:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    size: int
    replaced: bool
    organization: str


@dataclass(frozen=True)
class PreparedInstance:
    """An instance parsed and checked, its temp file's content on disk: what
    :meth:`Archive.prepare_temp` hands back for :meth:`Archive.store_prepared`."""

    temp: Path
    source: Source
    record: InstanceRecord  # with no blob key or receipt time yet
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


class Archive:
    """Blob store + index + events. Thread-safe; synchronous by design (pynetdicom runs
    handlers on association threads; aiohttp views call it through a thread pool)."""

    def __init__(
        self,
        root: Path,
        *,
        uid_root: str = "2.25",
        stable_after_s: float = 300.0,
        index: SQLiteIndex | None = None,
        blobs: BlobStore | None = None,
        metrics: Metrics | None = None,
        events: EventBus | None = None,
        repair: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.uid_root = uid_root
        self.stable_after_s = stable_after_s
        self.blobs: BlobStore = blobs or FileBlobStore(self.root / "blobs")
        self.index = index or SQLiteIndex(self.root / "index.sqlite", MIGRATION_SETS)
        self.metadata_cache = MetadataCache(self.root / "cache" / "metadata")
        self.identity = IdentityStore(self.index)
        self.events = events or EventBus()
        self.foreground = Foreground()  # requests being served; background work stands back
        self.metrics = metrics or Metrics()
        self.workitems = WorkitemStore(self.index, self.events, self.generate_uid)
        self._instance_locks = _InstanceLocks()
        self._studies_stored = _StudiesStored()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        if repair:  # off for a worker process joining a running node (cli/workers.py)
            self.repair()
        self.flusher: FolderFlusher | None = None
        self._temp_syncs: ThreadPoolExecutor | None = None
        # the syncs before an acknowledgement: side by side in the kernel, waited for by
        # the storing thread (storage/disk_sync.py), or else on threads of a pool
        self.syncs_together = False
        if isinstance(self.blobs, FileBlobStore):
            self.flusher = FolderFlusher(functools.partial(self.blobs.sync_folders, changed_only=True),
                                         self.index.journal_finished, self.blobs.discard_temp,
                                         drop_obsolete=self._drop_obsolete_files)
            self.syncs_together = disk_sync.available()
            if not self.syncs_together:
                self._temp_syncs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="temp-sync")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self._temp_syncs is not None:
            self._temp_syncs.shutdown(wait=True)
        if self.flusher is not None:
            self.flusher.close()  # the last keys made durable, their temp names and journal rows let go
        self.metadata_cache.close()
        self.index.close()
        close_blobs = getattr(self.blobs, "close", None)
        if close_blobs is not None:
            close_blobs()

    def start_stability_monitor(self, interval_s: float | None = None) -> None:
        """Emit ``study stable`` for studies with no new instance for ``stable_after_s``."""
        if self._monitor is not None:
            return
        interval = interval_s or max(0.2, min(30.0, self.stable_after_s / 5))

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check_stable_studies()
                except Exception:  # keep monitoring; the next pass retries
                    log.exception("study stability check failed")

        self._monitor = threading.Thread(target=run, name="study-stability", daemon=True)
        self._monitor.start()

    def check_stable_studies(self, now: float | None = None) -> list[str]:
        limit = (now or time.time()) - self.stable_after_s
        stable = []
        for study_uid in self.index.studies_to_stabilize(limit):
            if self.index.mark_stable(study_uid, limit):
                stable.append(study_uid)
                self.events.emit(StudyStable(study_uid=study_uid))
        return stable

    def repair(self, orphans_only: bool = False) -> dict[str, int]:
        """Finish or undo what a crash left half done: temp files, blobs being stored
        when the process died, blobs whose deletion was not completed.

        ``orphans_only``: only the stores of processes that are gone (a worker that
        died while this process keeps serving); journal rows without an owner may be
        work in flight here, and are left alone."""
        report = {"temp_removed": 0, "renamed": 0, "reindexed": 0, "dropped": 0, "deleted": 0}
        files = self.blobs if isinstance(self.blobs, FileBlobStore) else None
        done = []
        for pk, key, action, temp in self.index.journal_entries():
            if orphans_only and not (temp and files is not None):
                continue
            if temp and files is not None:
                if files.temp_owner_alive(Path(temp)):
                    continue  # a store in flight in another live process: its own to finish
                if self._finish_placement(files, Path(temp), key):
                    report["renamed"] += 1
            if action == "delete":
                if self.index.instance_by_blob(key) is None:
                    self._delete_blob(key)
                    report["deleted"] += 1
            elif self.blobs.exists(key):
                # The file reached its place; make the index describe exactly that file.
                self.metadata_cache.remove(key)
                try:
                    with self.blobs.open(key) as fh:
                        ds, tsuid = _parse(fh, os.fstat(fh.fileno()).st_size)
                    record = self._record(ds, tsuid, key, self._size(key), Source("repair"), time.time(),
                                          self.index.study_organization(str(ds.StudyInstanceUID)) or "local")
                    self._drop_obsolete(self.index.upsert_instance(record))
                    report["reindexed"] += 1
                except Exception as exc:
                    if self.index.instance_by_blob(key) is None:  # never a file a row describes
                        log.warning("repair: dropping unreadable blob %s: %s", key, exc)
                        self._delete_blob(key)
                        report["dropped"] += 1
            elif self.index.instance_by_blob(key) is not None:
                # The row was committed but neither the file's key nor its temp name survived.
                self.metadata_cache.remove(key)
                self.index.journal_remove(self.index.forget_blob(key))
                report["dropped"] += 1
            done.append(pk)
        self.index.journal_remove(done)
        if files is not None:
            # after the journal: a dead process's temp file may be what gives a file its key
            report["temp_removed"] = files.clear_temp()
        if any(report.values()):
            log.info("archive repair: %s", report)
        return report

    def _finish_placement(self, files: FileBlobStore, temp: Path, key: str) -> bool:
        """Give a file its key again (``FileBlobStore.place``) for a store whose journal
        row names ``temp``, when a crash lost the key and ``temp`` holds a complete
        instance (its content was synced before the row was committed, so a store that
        was acknowledged is always complete)."""
        if files.exists(key) or not temp.is_file():
            return False
        try:
            with open(temp, "rb") as fh:
                _parse(fh, os.fstat(fh.fileno()).st_size)
        except Exception:
            return False  # never acknowledged: clear_temp removes it
        files.sync_folders(files.place(temp, key))
        files.discard_temp(temp)
        return True

    def _size(self, key: str) -> int:
        path = self.blobs.local_path(key)
        return path.stat().st_size if path else 0

    # ------------------------------------------------------------------ ingest
    def store_bytes(self, data: bytes, source: Source, expected_study: str | None = None) -> StoreResult:
        """Store one encoded instance (a Part-10 file, or a bare dataset)."""
        return self.store_stream(io.BytesIO(data), source, expected_study)

    def store_stream(self, stream: BinaryIO, source: Source, expected_study: str | None = None) -> StoreResult:
        """Store one instance read from ``stream`` in chunks (memory stays flat).

        An error reading ``stream`` propagates as it is; an error writing the archive's
        temp file (disk full...) is a :class:`StorageFailure`, so callers can tell a bad
        input from an archive that cannot write."""
        return self.store_temp(self.copy_to_temp(stream), source, expected_study)

    def store_file(self, path: Path, source: Source, expected_study: str | None = None) -> StoreResult:
        """Store a copy of the file at ``path`` (the original is left alone)."""
        with open(path, "rb") as fh:
            return self.store_stream(fh, source, expected_study)

    def store_received_file(
        self, path: Path, source: Source, expected_study: str | None = None,
        name_synced: "BegunNameSync | None" = None,
    ) -> StoreResult:
        """Store the file at ``path``, which the caller gives up (a file a receiver wrote,
        such as pynetdicom's chunked C-STORE dataset): moved into the archive's temp
        folder when on the same file system, else copied. Same ingest path.

        ``name_synced``: what :meth:`start_name_sync` returned when the receiver created
        ``path`` in :meth:`receive_folder`."""
        path = Path(path)
        if path.parent == self.receive_folder():
            return self.store_temp(path, source, expected_study, name_synced)  # already in place
        adopt = getattr(self.blobs, "adopt_temp", None)
        temp = adopt(path) if adopt is not None else None
        if temp is None:
            try:
                return self.store_file(path, source, expected_study)
            finally:
                path.unlink(missing_ok=True)  # given up: gone once this returns, as in the other cases
        return self.store_temp(temp, source, expected_study)

    def receive_folder(self) -> Path | None:
        """Where a receiver may write a file it then gives to :meth:`store_received_file`
        (taken over as it is), or ``None`` when this blob store has no such folder."""
        return self.blobs.tmp if isinstance(self.blobs, FileBlobStore) else None

    def start_name_sync(self) -> "BegunNameSync | None":
        """A receiver has just created a file in :meth:`receive_folder`: start making its
        name durable now, beside the receipt, rather than once the file is complete.
        Hand the result to :meth:`store_received_file` with the file (``None``: the
        archive syncs the name then, together with the content where it can)."""
        return self._start_temp_sync()

    def new_temp(self) -> tuple[BinaryIO, Path]:
        """A temp file inside the archive that a caller fills and hands to ``store_temp``."""
        return self.blobs.new_temp()

    def copy_to_temp(self, stream: BinaryIO) -> Path:
        """A temp file (as from :meth:`new_temp`) holding what ``stream`` reads, copied in
        chunks. Errors as :meth:`store_stream`'s: reading ``stream`` propagates as it is,
        writing is a :class:`StorageFailure`; on either the temp file goes."""
        try:
            fh, temp = self.blobs.new_temp()
        except OSError as exc:
            raise StorageFailure(f"the archive could not write a temp file: {exc.strerror or exc}") from exc
        try:
            with fh:
                while chunk := stream.read(_COPY_CHUNK):
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise StorageFailure(f"the archive could not write: {exc.strerror or exc}") from exc
        except BaseException:
            self.blobs.discard_temp(temp)
            raise
        return temp

    def discard_temp(self, temp: Path) -> None:
        self.blobs.discard_temp(temp)

    def store_temp(
        self, temp: Path, source: Source, expected_study: str | None = None,
        name_synced: "BegunNameSync | None" = None,
    ) -> StoreResult:
        """The one ingest path. Takes ownership of ``temp`` (a file from :meth:`new_temp`).
        ``name_synced``: the sync of ``temp``'s name, when one was started already
        (:meth:`start_name_sync`)."""
        return self._owning(temp, source, lambda: self._ingest(temp, source, expected_study, name_synced))

    def prepare_temp(self, temp: Path, source: Source, expected_study: str | None = None) -> PreparedInstance:
        """The first half of :meth:`store_temp`, for a caller that may store nothing until
        more has arrived (a STOW-RS body is stored only once it is complete): parse and
        check the instance, and put the temp file's content and name on disk. Nothing
        is stored or visible yet. Hand the result to :meth:`store_prepared`, or give up
        and :meth:`discard_temp` its ``temp``.

        On failure ``temp`` is left as it was: the caller's, to read or to discard."""
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                synced = self._start_temp_sync()
                ds, tsuid = self._parse_temp(temp, fd, size)
                if getattr(ds, "_dicomnode_has_meta", True):
                    prepared = self._check(temp, size, ds, tsuid, source, expected_study)
                    if isinstance(self.blobs, FileBlobStore):
                        self._sync_temp(temp, synced, fd)
                    return prepared
            finally:
                os.close(fd)
            with_meta, size = _add_file_meta(temp, ds, tsuid, self.blobs)
            try:
                prepared = self._check(with_meta, size, ds, tsuid, source, expected_study)
                if isinstance(self.blobs, FileBlobStore):
                    self._sync_temp(with_meta, None)
            except BaseException:
                self.blobs.discard_temp(with_meta)
                raise
        except BaseException as exc:
            self._count_failure(exc)
            raise
        self.blobs.discard_temp(temp)  # its content lives on in ``with_meta``
        return prepared

    def store_prepared(self, prepared: PreparedInstance) -> StoreResult:
        """The second half of :meth:`store_temp`: store an instance :meth:`prepare_temp`
        checked. Takes ownership of ``prepared.temp``."""
        [outcome] = self.store_prepared_all([prepared])
        if isinstance(outcome, ArchiveError):
            raise outcome
        return outcome

    def _owning(self, temp: Path, source: Source, store: Callable[[], StoreResult]) -> StoreResult:
        """Run ``store``, which ends with ``temp`` placed in the archive (its temp name
        goes once the key is durable); on failure the temp file goes. Counts the outcome."""
        try:
            result = store()
        except BaseException as exc:
            self.blobs.discard_temp(temp)
            self._count_failure(exc)
            raise
        self.metrics.inc("dicomnode_instances_stored_total", source=source.kind)
        self.metrics.inc("dicomnode_bytes_stored_total", result.size, source=source.kind)
        return result

    def _count_failure(self, exc: BaseException) -> None:
        if isinstance(exc, InvalidInstance):
            self.metrics.inc("dicomnode_ingest_failures_total", reason=type(exc).__name__)
        elif isinstance(exc, StorageFailure):
            self.metrics.inc("dicomnode_ingest_failures_total", reason="StorageFailure")

    def _ingest(
        self, temp: Path, source: Source, expected_study: str | None,
        name_synced: "BegunNameSync | None" = None,
    ) -> StoreResult:
        # One descriptor for the size, the header and the content sync (no buffered file:
        # each Python open costs an fstat, an ioctl and seeks, and every syscall a GIL
        # hand-off on a busy node). fdatasync through a read-only descriptor syncs the
        # file's data all the same (Linux).
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            # the folder sync runs beside the parse and the content sync (or began with the receipt)
            synced = name_synced if name_synced is not None else self._start_temp_sync()
            ds, tsuid = self._parse_temp(temp, fd, size)
            if getattr(ds, "_dicomnode_has_meta", True):
                prepared = self._check(temp, size, ds, tsuid, source, expected_study)
                return self._store_checked(prepared, synced, fd)
        finally:
            os.close(fd)
        with_meta, size = _add_file_meta(temp, ds, tsuid, self.blobs)
        self.blobs.discard_temp(temp)
        try:
            return self._store_checked(self._check(with_meta, size, ds, tsuid, source, expected_study))
        except BaseException:
            self.blobs.discard_temp(with_meta)
            raise

    @staticmethod
    def _parse_temp(temp: Path, fd: int, size: int) -> tuple[Dataset, str]:
        parsed = read_header(_FdReader(fd), size)
        if parsed is None:  # pydicom decides
            with open(temp, "rb") as fh:
                parsed = _parse_with_pydicom(fh, size)
        return parsed

    def _start_temp_sync(self) -> "BegunNameSync | None":
        """Start syncing the temp file's name (its folder): in the kernel, or on the
        archive's pool; the caller syncs the content meanwhile. (``None``: no temp
        folder, or it could not be begun: the name is synced with the content.)"""
        blobs = self.blobs
        if self.syncs_together:
            assert isinstance(blobs, FileBlobStore)
            try:
                return disk_sync.start([(blobs.temp_folder_descriptor, False)])
            except (OSError, StorageFailure):
                return None
        if self._temp_syncs is None:
            return None
        assert isinstance(blobs, FileBlobStore)
        return self._temp_syncs.submit(blobs.sync_temp_folder)

    def _sync_temp(self, temp: Path, name_synced: "BegunNameSync | None",
                   fd: int | None = None) -> None:
        """The temp file's content and name on disk (``fd``: an open descriptor of it)."""
        assert isinstance(self.blobs, FileBlobStore)
        if self.syncs_together:
            self._sync_together(temp, fd, name_synced, index_too=False)
            return
        self.blobs.sync_temp(temp, fd)
        if name_synced is None:
            self.blobs.sync_temp_folder()
        else:
            assert isinstance(name_synced, Future)
            name_synced.result()

    def _sync_together(self, temp: Path, fd: int | None, name_synced: "BegunNameSync | None",
                       index_too: bool) -> None:
        """The temp file's content, its name (the temp folder, unless ``name_synced``
        began that sync already) and, with ``index_too``, every index commit so far (the
        WAL) on disk: synced side by side by the kernel, with one wait on this thread
        (storage/disk_sync.py)."""
        blobs = self.blobs
        assert isinstance(blobs, FileBlobStore)
        own = fd is None
        begun = name_synced if isinstance(name_synced, disk_sync.Pending) else None
        try:
            if own:
                fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
            assert fd is not None
            targets = [(fd, True)]
            if index_too:
                targets.append((self.index.wal_descriptor(), True))
            if begun is None:
                targets.append((blobs.temp_folder_descriptor, False))
            results = disk_sync.sync_together(targets)
            content = results[0]
            index = results[1] if index_too else None
            folder = begun.wait()[0] if begun is not None else results[-1]
        except OSError as exc:
            raise StorageFailure(f"could not write {temp.name}: {exc.strerror or exc}") from exc
        finally:
            if own and fd is not None:
                os.close(fd)
        if content is not None:
            raise StorageFailure(f"could not write {temp.name}: {content.strerror or content}")
        if folder is not None:
            raise StorageFailure(f"could not sync {blobs.tmp}: {folder.strerror or folder}")
        if index is not None:
            log.error("could not sync the index WAL: %s", index)
            raise StorageFailure(f"the index could not be synced to disk: {index.strerror or index}")

    def _check(
        self, temp: Path, size: int, ds: Dataset, tsuid: str, source: Source, expected_study: str | None,
    ) -> PreparedInstance:
        """What the index will say of the parsed instance in ``temp``, once it is checked."""
        sop_class = require_uid(ds.get("SOPClassUID"), "SOPClassUID")
        sop_uid = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        meta_uid = ds.file_meta.get("MediaStorageSOPInstanceUID")
        if meta_uid is not None and str(meta_uid).rstrip("\x00 ") != sop_uid:
            raise InvalidInstance(
                f"file meta MediaStorageSOPInstanceUID {meta_uid} does not match SOPInstanceUID {sop_uid}"
            )
        meta_class = ds.file_meta.get("MediaStorageSOPClassUID")
        if meta_class is not None and str(meta_class).rstrip("\x00 ") != sop_class:
            raise InvalidInstance(
                f"file meta MediaStorageSOPClassUID {meta_class} does not match SOPClassUID {sop_class}"
            )
        if sop_class not in STORAGE_SOP_CLASSES:
            raise UnsupportedSOPClass(f"SOP class {sop_class} is not a storage SOP class this node accepts")
        if expected_study is not None and expected_study != study_uid:
            raise StudyMismatch(
                f"instance {sop_uid} belongs to study {study_uid}, not {expected_study}",
                study_uid=study_uid,
            )
        record = self._record(ds, tsuid, "", size, source, 0.0, source.organization)
        return PreparedInstance(temp, source, record, sop_class, sop_uid, study_uid, series_uid)

    def _store_checked(
        self, prepared: PreparedInstance, synced: "BegunNameSync | None" = None,
        fd: int | None = None,
    ) -> StoreResult:
        temp = prepared.temp
        with self._instance_locks.holding([prepared.sop_instance_uid]):
            record = self._placement(prepared)
            key = record.blob_key
            if isinstance(self.blobs, FileBlobStore):
                outcome = self._commit_overlapped(temp, key, record, synced, fd)
            else:
                journal_pk = self.index.journal_add(key, "store")
                try:
                    self.blobs.commit(temp, key)
                    outcome = self.index.upsert_instance(record, journal_pk)
                except BaseException:
                    # Not acknowledged: put things back as they were (repair does the same
                    # after a crash): the new file goes, the one stored before stays.
                    self.repair_entry(journal_pk, key)
                    raise
        return self._stored(prepared, record, outcome)

    def store_prepared_all(self, parts: list[PreparedInstance]) -> list[StoreResult | ArchiveError]:
        """:meth:`store_prepared` for many instances, with one wait for the disk for all
        their journal rows and one trip to the index writer for all their rows (a STOW-RS
        body). Takes ownership of every temp file; returns, in order, each one's result
        or the :class:`ArchiveError` that refused it. Their SOP Instance UIDs must differ:
        else ``ValueError``, and nothing is taken over or stored."""
        if len({part.sop_instance_uid for part in parts}) != len(parts):
            raise ValueError("store_prepared_all takes instances with distinct SOP Instance UIDs")
        if not isinstance(self.blobs, FileBlobStore):  # no batch: one at a time
            return [self._store_or_refusal(part) for part in parts]
        outcomes: list[StoreResult | ArchiveError | None] = [None] * len(parts)
        for start in range(0, len(parts), _BATCH):
            chunk = range(start, min(start + _BATCH, len(parts)))
            for position, result in zip(chunk, self._store_batch([parts[p] for p in chunk])):
                outcomes[position] = result
        return outcomes  # type: ignore[return-value]

    def store_prepared_in_order(self, parts: list[PreparedInstance]) -> list[StoreResult | ArchiveError]:
        """:meth:`store_prepared_all` for parts that may carry the same SOP Instance UID
        more than once (a STOW-RS body, an import): those are stored one after the other
        in the parts' order, so the last one wins as when stored one by one; the k-th of
        each UID goes in the k-th call. Takes ownership of every temp file (those of
        later calls go when an earlier one fails); returns each part's outcome in order."""
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for position, part in enumerate(parts):
            k = seen[part.sop_instance_uid] = seen.get(part.sop_instance_uid, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(position)
        outcomes: list[StoreResult | ArchiveError | None] = [None] * len(parts)
        for k, positions in enumerate(rounds):
            try:
                results = self.store_prepared_all([parts[p] for p in positions])
            except BaseException:
                for later in rounds[k + 1:]:
                    for p in later:
                        self.blobs.discard_temp(parts[p].temp)
                raise
            for position, result in zip(positions, results):
                outcomes[position] = result
        return outcomes  # type: ignore[return-value]

    def _store_batch(self, parts: list[PreparedInstance]) -> list[StoreResult | ArchiveError]:
        """:meth:`_commit_overlapped` for each part, step by step for all of them at once."""
        blobs, flusher = self.blobs, self.flusher
        assert isinstance(blobs, FileBlobStore) and flusher is not None
        failed: dict[int, ArchiveError] = {}
        committed: list[tuple[int, InstanceRecord, UpsertOutcome]] = []

        def fail(position: int, exc: BaseException, journal_pk: int | None = None, key: str = "") -> None:
            if journal_pk is not None:
                self.repair_entry(journal_pk, key)
            blobs.discard_temp(parts[position].temp)
            if not isinstance(exc, ArchiveError):
                log.error("storing %s failed", parts[position].sop_instance_uid, exc_info=exc)
                exc = StorageFailure(f"the archive could not store the instance: {exc}")
            self._count_failure(exc)
            failed[position] = exc

        owners: dict[str, str | None] = {}
        with self._instance_locks.holding([part.sop_instance_uid for part in parts]):
            journaled = []
            for position, part in enumerate(parts):
                try:
                    record = self._placement(part, owners)
                except Exception as exc:
                    fail(position, exc)
                    continue
                journal = self.index.journal_add_async(record.blob_key, "store", temp=str(part.temp))
                journaled.append((position, record, journal))
            indexed = []
            for position, record, journal in journaled:
                try:
                    journal_pk = journal.result()
                except Exception as exc:
                    fail(position, exc)
                    continue
                try:
                    folders = blobs.place(parts[position].temp, record.blob_key)
                except Exception as exc:
                    fail(position, exc, journal_pk, record.blob_key)
                    continue
                indexed.append((position, record, journal_pk, folders,
                                self.index.upsert_instance_async(record, durable=False)))
            for position, record, journal_pk, folders, upsert in indexed:
                try:
                    outcome = upsert.result()
                except Exception as exc:
                    fail(position, exc, journal_pk, record.blob_key)
                    continue
                flusher.submit(folders, journal_pk, parts[position].temp)
                committed.append((position, record, outcome))
        results: list[Any] = [failed.get(position) for position in range(len(parts))]
        for position, record, outcome in committed:
            result = results[position] = self._stored(parts[position], record, outcome)
            self.metrics.inc("dicomnode_instances_stored_total", source=parts[position].source.kind)
            self.metrics.inc("dicomnode_bytes_stored_total", result.size, source=parts[position].source.kind)
        return results

    def _store_or_refusal(self, part: PreparedInstance) -> StoreResult | ArchiveError:
        try:
            return self._owning(part.temp, part.source, lambda: self._store_checked(part))
        except ArchiveError as exc:
            return exc

    def _placement(self, prepared: PreparedInstance, owners: dict[str, str | None] | None = None) -> InstanceRecord:
        """The index row for ``prepared``, with the key its file will have; under its
        instance lock. ``owners``: the organizations of studies a batch looked up so far."""
        source, study_uid, series_uid = prepared.source, prepared.study_uid, prepared.series_uid
        sop_uid = prepared.sop_instance_uid
        # Refused before the file goes in place: a study of another organization. (The
        # index row is the check that holds, in the writer's transaction; this one spares
        # the file's rename and the row's attempt.) A study this process stored into for
        # the same organization a moment ago needs no query: if it has been deleted and
        # made again by another organization since, the index refuses.
        owners = {} if owners is None else owners
        if study_uid not in owners:
            if self._studies_stored.holds(study_uid, source.organization):
                owners[study_uid] = source.organization
            else:
                owners[study_uid] = self.index.study_organization(study_uid)
        owner = owners[study_uid]
        if owner is not None and owner != source.organization:
            raise Conflict(f"study {study_uid} belongs to another organization", study_uid=study_uid)
        key = f"{study_uid}/{series_uid}/{sop_uid}.dcm"
        if self.blobs.exists(key):
            # A replacement goes to a new key: the stored file stays untouched until
            # the index points at the new one, so a refused or interrupted re-send
            # never changes what was acknowledged before.
            key = f"{study_uid}/{series_uid}/{sop_uid}.{uuid.uuid4().hex[:12]}.dcm"
        return dataclasses.replace(prepared.record, blob_key=key, received_at=time.time())

    def _stored(self, prepared: PreparedInstance, record: InstanceRecord, outcome: UpsertOutcome) -> StoreResult:
        """An instance is stored: its obsolete file goes (soon, with the flusher's next
        batch, where there is one), it is logged and announced."""
        if outcome.obsolete_blob and self.flusher is not None:
            self.flusher.submit_obsolete(outcome.obsolete_blob, outcome.obsolete_journal)
        else:
            self._drop_obsolete(outcome)
        source = prepared.source
        self._studies_stored.add(prepared.study_uid, source.organization)
        result = StoreResult(
            sop_class_uid=prepared.sop_class_uid,
            sop_instance_uid=prepared.sop_instance_uid,
            study_uid=prepared.study_uid,
            series_uid=prepared.series_uid,
            transfer_syntax_uid=record.transfer_syntax_uid,
            size=record.size,
            replaced=outcome.replaced,
            organization=source.organization,
        )
        log.info(
            "stored %s %s (study %s) from %s%s", _sop_name(result.sop_class_uid), result.sop_instance_uid,
            result.study_uid, source, " (replaced)" if outcome.replaced else "",
        )
        self.events.emit(InstanceStored(result=result, source=source, new_study=outcome.new_study))
        return result

    def _drop_obsolete(self, outcome: UpsertOutcome) -> None:
        """Delete the file a replacement made obsolete, here and now (repair, a blob
        store without a flusher)."""
        if outcome.obsolete_blob:
            self._drop_obsolete_files([(outcome.obsolete_blob, outcome.obsolete_journal)])

    def _drop_obsolete_files(self, obsolete: list[tuple[str, int | None]]) -> None:
        """Delete files replacements made obsolete, once the rows pointing at the new
        files are on disk: one sync of the index makes them durable (every commit before
        the sync is: the rows were committed before their instances were acknowledged).
        Then each old file goes, and its journal row with it. The flusher calls this for
        a batch."""
        journal = [pk for _, pk in obsolete if pk is not None]
        if journal:
            self.index.journal_sync(max(journal))
        for key, pk in obsolete:
            self._delete_blob(key)
            if pk is not None:
                self.index.journal_finished(pk)

    def _delete_blob(self, key: str) -> None:
        """Delete a blob and what was derived from it (the derived data first: a crash
        in between leaves a blob without cache entry, never an entry without blob)."""
        self.metadata_cache.remove(key)
        self.blobs.delete(key)

    def _commit_overlapped(
        self, temp: Path, key: str, record: InstanceRecord, synced: "BegunNameSync | None" = None,
        fd: int | None = None,
    ) -> Any:
        """Journal, file and index with one wait for the disk before the acknowledgement:

        1. in parallel: the journal row naming ``key`` and ``temp`` committed to disk,
           the temp file's content synced, the temp folder synced (its name durable).
           Where the kernel can sync them side by side for this thread
           (``syncs_together``), the row is committed first and the three syncs (the
           index's WAL, the content, the folder) are one wait; else the row's sync and
           the folder's run on other threads;
        2. ``key`` linked to ``temp`` (``FileBlobStore.place``); the index row committed,
           visible but not synced (the durable journal row lets repair redo it);
        3. acknowledged. The flusher syncs the folders of ``key`` later, in batches, and
           then removes the temp name and lets the journal row go (deleted with a later
           transaction).

        A crash after 1 leaves repair a row and a complete file, at ``key`` or at
        ``temp`` (the temp name stays on disk until ``key`` is): it finishes the naming
        and re-indexes the file. A crash before 1 ends leaves a row whose file is not
        at ``key``: dropped, with the temp file."""
        blobs = self.blobs
        assert isinstance(blobs, FileBlobStore) and self.flusher is not None
        if self.syncs_together:
            # the row committed first, then the content, the name and the row synced at once
            journal_pk = self.index.journal_add_async(key, "store", temp=str(temp), here=True,
                                                      durable=False).result()
            try:
                self._sync_together(temp, fd, synced, index_too=True)
            except BaseException:
                self.repair_entry(journal_pk, key)  # nothing was placed
                raise
        else:
            # one instance: its index jobs run on this thread when the writer is idle
            journal = self.index.journal_add_async(key, "store", temp=str(temp), here=True)
            try:
                self._sync_temp(temp, synced, fd)
            except BaseException:
                if journal.exception() is None:
                    self.repair_entry(journal.result(), key)  # nothing was placed
                raise
            journal_pk = journal.result()  # raises (nothing placed yet) if the journal failed
        try:
            folders = blobs.place(temp, key)
            outcome = self.index.upsert_instance_async(record, durable=False, here=True).result()
        except BaseException:
            self.repair_entry(journal_pk, key)
            raise
        self.flusher.submit(folders, journal_pk, temp)
        return outcome

    def repair_entry(self, journal_pk: int, key: str) -> None:
        """Undo one interrupted store: drop the blob unless a row describes it."""
        try:
            if self.index.instance_by_blob(key) is None:
                self._delete_blob(key)
            self.index.journal_remove([journal_pk])
        except Exception:
            log.exception("could not undo interrupted store of %s; repair will on next start", key)

    def _record(
        self, ds: Dataset, tsuid: str, key: str, size: int, source: Source, now: float, org: str
    ) -> InstanceRecord:
        levels = {}
        for level in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
            values = {}
            for attr in COLUMNS_BY_LEVEL[level]:
                values[attr.column] = _column_value(ds, attr.keyword, attr.kind)
            levels[level] = values
        return InstanceRecord(
            patient=levels["PATIENT"],
            study=levels["STUDY"],
            series=levels["SERIES"],
            instance=levels["IMAGE"],
            organization=org,
            transfer_syntax_uid=tsuid,
            blob_key=key,
            size=size,
            source=str(source),
            received_at=now,
        )

    # ------------------------------------------------------------------ query
    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[dict[str, Any]]:
        """Matches of ``query`` as ``{keyword: value}`` dicts, streamed from the index.

        Requested attributes the index does not hold are read from the stored file at
        the IMAGE level and returned empty above it."""
        compiled = compile_query(query)
        needs_file = query.level == "IMAGE" and bool(compiled.extra_keys)
        for row in self.index.query(compiled):
            if is_cancelled():
                return
            values = row_to_values(compiled, row)
            if needs_file:
                values.update(self._file_values(values["SOPInstanceUID"], compiled.extra_keys))
            else:
                for keyword in compiled.extra_keys:
                    values.setdefault(keyword, None)
            yield values

    def _file_values(self, sop_uid: str, keywords: tuple[str, ...]) -> dict[str, Any]:
        found = self.index.instances(sop_instance_uids=(sop_uid,))
        out: dict[str, Any] = {k: None for k in keywords}
        if not found:
            return out
        try:
            with self.blobs.open(found[0].blob_key) as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=_DEFER_SIZE)
        except (OSError, InvalidDicomError):
            return out
        for keyword in keywords:
            if keyword in ds:
                out[keyword] = ds[keyword]
        return out

    def instances(
        self,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_instance_uids: tuple[str, ...] | None = None,
        organizations: tuple[str, ...] | None = None,
    ) -> list[StoredInstance]:
        """The stored instances of a study, series or list of instances (for retrieval)."""
        return self.index.instances(study_uid, series_uid, sop_instance_uids, organizations)

    def retrieve(
        self,
        level: str,
        keys: dict[str, str],
        root: str = "STUDY",
        organizations: tuple[str, ...] | None = None,
    ) -> list[StoredInstance]:
        """The instances a C-MOVE or C-GET identifier addresses. The unique key of the
        retrieve level must be given (PS3.4 C.4.2.1.4); lists of UIDs are allowed."""
        unique = UNIQUE_KEY.get(level)
        if unique is None:
            raise InvalidQuery(f"unknown retrieve level {level!r}")
        if not str(keys.get(unique) or "").strip():
            raise InvalidQuery(f"a {level} level retrieve needs {unique}")
        wanted = {
            k: keys[k]
            for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            if str(keys.get(k) or "").strip() and LEVEL_RANK[BY_KEYWORD[k].level] <= LEVEL_RANK[level]
        }
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if k in wanted:
                for uid in str(wanted[k]).split("\\"):
                    if uid.strip():
                        require_uid(uid.strip(), k)
        query = Query("IMAGE", {**wanted, "SOPInstanceUID": wanted.get("SOPInstanceUID", "")}, root, organizations)
        sop_uids = [values["SOPInstanceUID"] for values in self.find(query)]
        found: list[StoredInstance] = []
        for start in range(0, len(sop_uids), 500):
            found.extend(self.index.instances(sop_instance_uids=tuple(sop_uids[start:start + 500])))
        return found

    def instance(self, study_uid: str, series_uid: str | None, sop_uid: str,
                 organizations: tuple[str, ...] | None = None) -> StoredInstance:
        found = self.index.instances(study_uid, series_uid, (sop_uid,), organizations)
        if not found:
            raise NotFound(f"instance {sop_uid} not found")
        return found[0]

    def open_instance(self, stored: StoredInstance) -> BinaryIO:
        try:
            return self.blobs.open(stored.blob_key)
        except FileNotFoundError as exc:
            raise NotFound(f"the file of instance {stored.sop_instance_uid} is missing") from exc

    def instance_path(self, stored: StoredInstance) -> Path | None:
        return self.blobs.local_path(stored.blob_key)

    def read_dataset(self, stored: StoredInstance, stop_before_pixels: bool = False) -> Dataset:
        with self.open_instance(stored) as fh:
            return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)

    def instance_metadata(self, stored: StoredInstance, version: str,
                          build: Callable[[StoredInstance, Dataset], bytes]) -> bytes:
        """``build(stored, dataset)`` (the dataset read without pixel data), cached per
        blob. ``version`` names the format ``build`` makes: bump it when that changes.
        The entry is used only while the blob is the very file it was made from (size,
        mtime, inode) and its check passes; otherwise it is rebuilt and rewritten."""
        key = stored.blob_key
        path = self.blobs.local_path(key)
        if path is None:  # not a local file store: nothing to tell a stale entry by
            return build(stored, self.read_dataset(stored, stop_before_pixels=True))
        try:
            cached = self.metadata_cache.read(key, stamp_of(version, os.stat(path)))
        except FileNotFoundError:
            cached = None  # open_instance below says NotFound
        if cached is not None:
            return cached
        with self.open_instance(stored) as fh:
            stamp = stamp_of(version, os.fstat(fh.fileno()))
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        body = build(stored, ds)
        # written in the background; removed again if the blob was deleted or replaced
        # while we built it, so that no entry outlives its file
        self.metadata_cache.write_later(key, stamp, body, lambda: stamp_of(version, os.stat(path)) == stamp)
        return body

    # ------------------------------------------------------------------ delete
    def delete(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        organizations: tuple[str, ...] | None = None,
    ) -> int:
        """Delete a study, series or instance: rows first (journalled), then files."""
        keys, journal = self.index.delete(study_uid, series_uid, sop_instance_uid, organizations)
        for key in keys:
            self._delete_blob(key)
        self.index.journal_remove(journal)
        log.info("deleted %d instance(s) of study %s", len(keys), study_uid)
        return len(keys)

    # ------------------------------------------------------------------ misc
    def generate_uid(self) -> str:
        return generate_uid(self.uid_root)

    def counts(self) -> dict[str, int]:
        return self.index.counts()


# ---------------------------------------------------------------------- parsing helpers


def _parse(fh: BinaryIO, size: int) -> tuple[Dataset, str]:
    """Parse an instance once, without loading large values; check it is complete.

    Returns the dataset and its transfer syntax. A dataset without file meta gets
    ``_dicomnode_has_meta = False`` so that the caller adds the meta information.

    Most files are read by :func:`storage.header.read_header`, which gives the same
    values and decision for what it accepts; pydicom reads the others."""
    fast = read_header(fh, size)
    if fast is not None:
        return fast  # type: ignore[return-value]  # a FastHeader serves as the Dataset here
    return _parse_with_pydicom(fh, size)


class _StudiesStored:
    """The organization of the studies this process stored into last (a few hundred).
    What it says may be out of date (a study deleted since): a hint, which the index
    checks again."""

    SIZE = 512

    def __init__(self) -> None:
        self._orgs: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def holds(self, study_uid: str, organization: str) -> bool:
        return self._orgs.get(study_uid) == organization

    def add(self, study_uid: str, organization: str) -> None:
        with self._lock:
            self._orgs[study_uid] = organization
            self._orgs.move_to_end(study_uid)
            if len(self._orgs) > self.SIZE:
                self._orgs.popitem(last=False)


class _InstanceLocks:
    """Stores of one SOP Instance UID go one at a time: its key is chosen and its file
    and row committed under the lock (another UID never waits)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def holding(self, uids: Iterable[str]) -> Iterator[None]:
        mine = set(uids)
        with self._changed:
            self._changed.wait_for(lambda: self._busy.isdisjoint(mine))
            self._busy |= mine
        try:
            yield
        finally:
            with self._changed:
                self._busy -= mine
                self._changed.notify_all()


class _FdReader:
    """``seek`` and ``read`` (what :func:`read_header` uses) over a raw descriptor, by
    ``pread``: no buffered file object, no syscall for a seek."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise io.UnsupportedOperation("only absolute seeks")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def _parse_with_pydicom(fh: BinaryIO, size: int) -> tuple[Dataset, str]:
    """:func:`_parse` for every file, by pydicom: the reference the fast path matches."""
    fh.seek(0)
    has_meta = True
    try:
        ds = pydicom.dcmread(fh, defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        fh.seek(0)
        has_meta = False
        try:
            ds = pydicom.dcmread(fh, defer_size=_DEFER_SIZE, force=True)
        except Exception as exc:
            raise NotDicom(f"not a DICOM file: {exc}") from exc
    except Exception as exc:
        raise NotDicom(f"not a DICOM file: {exc}") from exc
    tsuid = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    if has_meta and tsuid is None:
        has_meta = False
    if not has_meta and "SOPInstanceUID" not in ds and "SOPClassUID" not in ds:
        # checked before truncation: a text file read as DICOM "declares" huge lengths
        raise NotDicom("not a DICOM file: no DICM prefix and no SOP Class/Instance UID")
    if fh.tell() > size or _last_value_short(ds, fh, size):
        # cannot be understood as sent: C-STORE 0xC000, not "does not match SOP class"
        raise NotDicom(f"the dataset is truncated or corrupt: it declares more bytes than the {size} it has")
    if not has_meta:
        implicit, little = ds.original_encoding
        if implicit is None:
            raise NotDicom("not a DICOM file: the encoding could not be determined")
        # A file meta group without the preamble (what pydicom.dcmwrite writes by default)
        # names the transfer syntax, which the body's encoding alone cannot tell apart
        # from a compressed one: keep it, and skip that group when the meta is rewritten.
        meta_bytes = _bare_meta_group_size(fh) if tsuid is not None else 0
        if not meta_bytes:
            tsuid = (
                pydicom.uid.ImplicitVRLittleEndian
                if implicit
                else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
            )
        ds._dicomnode_has_meta = False  # type: ignore[attr-defined]
        ds._dicomnode_meta_bytes = meta_bytes  # type: ignore[attr-defined]
    try:
        # touch the attributes the index needs, so a malformed value fails here
        for level in COLUMNS_BY_LEVEL.values():
            for attr in level:
                ds.get(attr.keyword)
    except Exception as exc:
        raise InvalidInstance(f"malformed attribute: {exc}") from exc
    return ds, str(tsuid)


def _last_value_short(ds: Dataset, fh: BinaryIO, size: int) -> bool:
    """True when the file ended inside its last element. pydicom reads a short value
    without complaint when it is below the defer size, and stops at the end of the file
    (with a warning) when an undefined-length value has no sequence delimiter."""
    if not len(ds):
        return size > 132  # pydicom gives up on a cut encapsulated value with an empty dataset
    elem = ds.get_item(next(reversed(ds.keys())))
    if isinstance(elem, pydicom.dataelem.RawDataElement):
        undefined = elem.length == 0xFFFFFFFF
        if not undefined:
            return elem.value is not None and len(elem.value) < elem.length
    else:
        undefined = bool(getattr(elem, "is_undefined_length", False))
    if not undefined:
        return False
    delimiter = b"\xfe\xff\xdd\xe0" if ds.original_encoding[1] is not False else b"\xff\xfe\xe0\xdd"
    if size < 8:
        return True
    fh.seek(size - 8)
    return fh.read(8) != delimiter + b"\x00" * 4


def _add_file_meta(temp: Path, ds: Dataset, tsuid: str, blobs: BlobStore) -> tuple[Path, int]:
    """A new temp file: the bare dataset in ``temp`` (left as it is) prefixed with
    preamble and file meta; the dataset bytes are kept."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = tsuid
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    fh, new_temp = blobs.new_temp()
    with fh, open(temp, "rb") as src:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        src.seek(getattr(ds, "_dicomnode_meta_bytes", 0))
        shutil.copyfileobj(src, fh, _COPY_CHUNK)
        size = fh.tell()
    return new_temp, size


def _bare_meta_group_size(fh: BinaryIO) -> int:
    """Bytes of the group 0002 elements at the very start of a file with no preamble
    (explicit VR little endian, PS3.10 7.1); 0 when the file does not start so."""
    fh.seek(0)
    end = 0
    while True:
        head = fh.read(8)
        if len(head) < 8 or int.from_bytes(head[:2], "little") != 0x0002:
            return end
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(fh.read(4), "little")
            header = 12
        else:
            length = int.from_bytes(head[6:8], "little")
            header = 8
        if length == 0xFFFFFFFF:
            return 0  # not a meta group this node can skip safely
        end += header + length
        fh.seek(end)


def _column_value(ds: Dataset, keyword: str, kind: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None if kind == "int" else ""
    if kind == "int":
        try:
            return int(value[0] if isinstance(value, (list, pydicom.multival.MultiValue)) else value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).rstrip("\x00 ")
    if kind == "date":
        return normalize_date(text)
    if kind == "time":
        return normalize_time(text)
    return text


def _sop_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    return name if name and name != uid else "instance"
