"""Bulk import of files, folders (recursive) and .zip archives through the one ingest path."""
from __future__ import annotations

import itertools
import os
import threading
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Generator, Iterable

from .archive import Archive, PreparedInstance, Source, StoreResult
from .errors import ArchiveError, StorageFailure


_THREADS = 4  # items copied and prepared at once
_WINDOW = 64  # items in hand at most: being prepared, prepared, being stored
_BATCH = 32  # items stored together at most


@dataclass(frozen=True)
class ImportOutcome:
    name: str  # file path, or "archive.zip!member"
    status: str  # stored, duplicate, rejected (a bad file), failed (the archive could not write)
    reason: str = ""
    size: int = 0


@dataclass
class ImportSummary:
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0  # bad input files
    failed: int = 0  # good or unknown input the archive could not write (disk full...)
    rejections: list[ImportOutcome] = field(default_factory=list)
    failures: list[ImportOutcome] = field(default_factory=list)

    def add(self, outcome: ImportOutcome) -> None:
        if outcome.status == "stored":
            self.stored += 1
        elif outcome.status == "duplicate":
            self.duplicate += 1
        elif outcome.status == "failed":
            self.failed += 1
            self.failures.append(outcome)
        else:
            self.rejected += 1
            self.rejections.append(outcome)

    @property
    def done(self) -> int:
        return self.stored + self.duplicate + self.rejected + self.failed


@dataclass(frozen=True)
class ImportItem:
    name: str
    size: int
    path: Path
    member: str | None = None  # a member of the zip archive at ``path``


def collect(paths: Iterable[Path]) -> list[ImportItem]:
    """Everything to import, expanded: folders recursively, zip archives by member."""
    items: list[ImportItem] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    items.extend(_file_items(Path(dirpath, name)))
        elif path.exists():
            items.extend(_file_items(path))
        else:
            items.append(ImportItem(str(path), 0, path))
    return items


def _is_dicomdir(name: str) -> bool:
    """A media directory (the index of a CD), not an instance: never imported."""
    return name.replace("\\", "/").rsplit("/", 1)[-1].upper() == "DICOMDIR"


def _file_items(path: Path) -> list[ImportItem]:
    if _is_dicomdir(path.name):
        return []
    if path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [
                ImportItem(f"{path}!{info.filename}", info.file_size, path, info.filename)
                for info in zf.infolist()
                if not info.is_dir() and not _is_dicomdir(info.filename)
            ]
    return [ImportItem(str(path), path.stat().st_size, path)]


def import_items(
    archive: Archive, items: Iterable[ImportItem], source: Source, stop: Callable[[], bool] = lambda: False,
) -> Generator[ImportOutcome, None, None]:
    """Store each item; yields one outcome per item, in the order of ``items`` (never
    raises for a bad file).

    A few threads copy items into the archive's temp folder and prepare them (parse,
    check, sync: :meth:`Archive.prepare_temp`), at most ``_WINDOW`` ahead of what is
    stored; this thread stores what they prepared in batches
    (:meth:`Archive.store_prepared_in_order`: the same instance twice, the later one
    wins) and yields the outcomes of each batch.

    ``stop`` is asked before each batch: once it says so, nothing more is stored and
    the outcomes end with those of the last batch stored. Closing the generator early
    stores nothing more either, but the outcomes after the last one taken, of items
    stored with it, are not told. Either way no prepared temp file is left behind."""
    items = iter(items)
    readers = _Readers()
    pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="import")
    ahead: deque[tuple[ImportItem, Future[PreparedInstance | ImportOutcome]]] = deque()  # not stored yet
    try:
        while not stop():
            while len(ahead) < _WINDOW and (item := next(items, None)) is not None:
                ahead.append((item, pool.submit(_prepare, archive, readers, item, source)))
            if not ahead:
                return
            batch = _next_batch(ahead)  # the others in ``ahead`` are prepared meanwhile
            for _ in batch:  # handed over to the archive
                ahead.popleft()
            parts = [done for _, done in batch if isinstance(done, PreparedInstance)]
            results = iter(archive.store_prepared_in_order(parts))
            for item, done in batch:
                yield _outcome(item, next(results) if isinstance(done, PreparedInstance) else done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        readers.close()
        for _, future in ahead:  # prepared, never stored
            if not future.cancelled() and future.exception() is None:
                if isinstance(done := future.result(), PreparedInstance):
                    archive.discard_temp(done.temp)


def _next_batch(
    ahead: deque[tuple[ImportItem, Future[PreparedInstance | ImportOutcome]]],
) -> list[tuple[ImportItem, PreparedInstance | ImportOutcome]]:
    """The items at the front of ``ahead`` to store together: the first (waited for)
    and those after it that are ready, up to ``_BATCH``."""
    batch: list[tuple[ImportItem, PreparedInstance | ImportOutcome]] = []
    for item, future in itertools.islice(ahead, _BATCH):
        if batch and not future.done():
            break
        batch.append((item, future.result()))
    return batch


def _prepare(
    archive: Archive, readers: _Readers, item: ImportItem, source: Source,
) -> PreparedInstance | ImportOutcome:
    """Copy ``item`` into a temp file and prepare it; or why it cannot be stored."""
    try:
        if not item.path.exists():
            return ImportOutcome(item.name, "rejected", "no such file or folder")
        with readers.open(item) as stream:
            temp = archive.copy_to_temp(stream)
        try:
            return archive.prepare_temp(temp, source)
        except BaseException:
            archive.discard_temp(temp)
            raise
    except ArchiveError as exc:
        return _outcome(item, exc)
    except (OSError, zipfile.BadZipFile) as exc:
        return ImportOutcome(item.name, "rejected", f"cannot read: {exc}", item.size)


def _outcome(item: ImportItem, done: StoreResult | ArchiveError | ImportOutcome) -> ImportOutcome:
    if isinstance(done, ImportOutcome):
        return done
    if isinstance(done, StorageFailure):  # the archive could not write
        return ImportOutcome(item.name, "failed", done.message, item.size)
    if isinstance(done, ArchiveError):  # InvalidInstance and any other refusal: a bad file
        return ImportOutcome(item.name, "rejected", done.message, item.size)
    return ImportOutcome(item.name, "duplicate" if done.replaced else "stored", "", done.size)


class _Readers:
    """Opens items for the import threads. A ZipFile is not to be read by two threads
    at once: each thread opens its own, and keeps only the one it read last open (items
    come in order, so the members of one archive come one after the other)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._open: set[zipfile.ZipFile] = set()
        self._lock = threading.Lock()

    def open(self, item: ImportItem) -> BinaryIO:
        if item.member is None:
            return open(item.path, "rb")
        path, zf = getattr(self._local, "zip", (None, None))
        if path != item.path:
            if zf is not None:
                self._local.zip = (None, None)
                self._forget(zf)
            zf = zipfile.ZipFile(item.path)
            with self._lock:
                self._open.add(zf)
            self._local.zip = (item.path, zf)
        return zf.open(item.member)

    def _forget(self, zf: zipfile.ZipFile) -> None:
        with self._lock:
            self._open.discard(zf)
        zf.close()

    def close(self) -> None:
        """Close every archive still open (once no thread reads any more)."""
        for zf in list(self._open):
            self._forget(zf)
