"""Blob stores: where the bytes of stored instances live.

The embedded default is a folder on disk. The interface is small on purpose, so that an
S3-compatible store can stand in for :class:`FileBlobStore` without touching callers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from .errors import StorageFailure


class BlobStore(Protocol):
    def new_temp(self) -> tuple[BinaryIO, Path]: ...
    def commit(self, temp_path: Path, key: str) -> int: ...
    def open(self, key: str) -> BinaryIO: ...
    def local_path(self, key: str) -> Path | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def discard_temp(self, temp_path: Path) -> None: ...
    def iter_keys(self) -> Iterator[str]: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore:
    """Blobs as files under ``root``; writes are atomic (temp file, fsync, rename, fsync dir)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageFailure(f"blob key {key!r} points outside the archive")
        return path

    def new_temp(self) -> tuple[BinaryIO, Path]:
        """An open binary file in the archive's temp folder, on the same file system as
        the final location so that the later rename is atomic."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return os.fdopen(fd, "w+b"), Path(name)

    def adopt_temp(self, path: Path) -> Path | None:
        """Move a file the caller gives up into the temp folder (a rename: no copy);
        ``None`` when it lives on another file system."""
        name = self.tmp / f"{uuid.uuid4().hex}.part"  # a fresh name; nothing else writes here
        try:
            os.replace(path, name)
        except OSError:
            return None
        return name

    def commit(self, temp_path: Path, key: str) -> int:
        """Move a fully written temp file to ``key`` atomically; returns its size."""
        final = self._path(key)
        try:
            with open(temp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            size = os.path.getsize(temp_path)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp_path, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageFailure(f"could not write {key}: {exc.strerror or exc}") from exc
        return size

    # The three steps of ``commit``, for a caller that overlaps the fsyncs with other
    # work (the archive runs the index commits meanwhile). Same order, same guarantees.
    def sync_temp(self, temp_path: Path) -> None:
        """Make the temp file's content durable."""
        try:
            with open(temp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StorageFailure(f"could not write {temp_path.name}: {exc.strerror or exc}") from exc

    def place(self, temp_path: Path, key: str) -> None:
        """Rename a synced temp file to ``key`` (durable once ``sync_place`` returns)."""
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp_path, final)
        except OSError as exc:
            raise StorageFailure(f"could not write {key}: {exc.strerror or exc}") from exc

    def sync_place(self, key: str) -> None:
        """Make the rename of ``key`` durable (fsync its folder)."""
        try:
            _fsync_dir(self._path(key).parent)
        except OSError as exc:
            raise StorageFailure(f"could not write {key}: {exc.strerror or exc}") from exc

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break

    def discard_temp(self, temp_path: Path) -> None:
        try:
            Path(temp_path).unlink()
        except FileNotFoundError:
            pass

    def clear_temp(self) -> int:
        """Remove temp files a crash left behind; returns how many."""
        count = 0
        for entry in self.tmp.iterdir():
            if entry.is_file():
                entry.unlink()
                count += 1
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                count += 1
        return count

    def iter_keys(self) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.endswith(".dcm"):
                    yield str(Path(dirpath, name).relative_to(self.root))
