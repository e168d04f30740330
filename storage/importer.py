"""Bulk import of files, folders (recursive) and .zip archives through the one ingest path."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .archive import Archive, Source
from .errors import ArchiveError, InvalidInstance, StorageFailure


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


def import_items(archive: Archive, items: Iterable[ImportItem], source: Source) -> Iterator[ImportOutcome]:
    """Store each item; yields one outcome per item (never raises for a bad file)."""
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for item in items:
            try:
                if not item.path.exists():
                    yield ImportOutcome(item.name, "rejected", "no such file or folder")
                    continue
                if item.member is None:
                    result = archive.store_file(item.path, source)
                else:
                    zf = zips.get(item.path)
                    if zf is None:
                        zf = zips[item.path] = zipfile.ZipFile(item.path)
                    with zf.open(item.member) as stream:
                        result = archive.store_stream(stream, source)
            except InvalidInstance as exc:
                yield ImportOutcome(item.name, "rejected", exc.message, item.size)
            except StorageFailure as exc:
                yield ImportOutcome(item.name, "failed", exc.message, item.size)
            except ArchiveError as exc:
                yield ImportOutcome(item.name, "rejected", exc.message, item.size)
            except (OSError, zipfile.BadZipFile) as exc:
                yield ImportOutcome(item.name, "rejected", f"cannot read: {exc}", item.size)
            else:
                yield ImportOutcome(item.name, "duplicate" if result.replaced else "stored", "", result.size)
    finally:
        for zf in zips.values():
            zf.close()
