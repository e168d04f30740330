"""The inbox: a folder watched with watchdog. A file is imported once it is completely
written (its size and modification time unchanged for ``settle_s``), removed once it is
safely stored, and moved to ``rejected/`` with the reason beside it when it is not DICOM."""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .archive import Archive, Source
from .importer import collect, import_items

log = logging.getLogger("dicomnode.inbox")

REJECTED = "rejected"


class _Events(FileSystemEventHandler):
    def __init__(self, inbox: "Inbox") -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        for attr in ("src_path", "dest_path"):
            path = getattr(event, attr, None)
            if path:
                self.inbox.notice(Path(os.fsdecode(path)))


class Inbox:
    def __init__(self, folder: Path, archive: Archive, settle_s: float = 2.0, poll_s: float = 0.25,
                 rescan_s: float = 30.0) -> None:
        self.folder = Path(folder)
        self.rejected = self.folder / REJECTED
        self.archive = archive
        self.settle_s = settle_s
        self.poll_s = poll_s
        # watchdog misses files written over NFS/SMB by another machine, and events lost
        # when the kernel queue overflows: a periodic rescan picks those up
        self.rescan_s = rescan_s
        self._seen: dict[Path, tuple[int, float, float]] = {}  # path -> size, mtime, since
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(exist_ok=True)
        self._rescan()
        observer = Observer()
        observer.schedule(_Events(self), str(self.folder), recursive=True)
        observer.start()
        self._observer = observer
        self._worker = threading.Thread(target=self._run, name="inbox", daemon=True)
        self._worker.start()
        log.info("watching inbox %s", self.folder)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._worker is not None:
            self._worker.join(timeout=30)

    def notice(self, path: Path) -> None:
        if not path.is_file() or self._ignored(path):
            return
        with self._lock:
            self._seen.setdefault(path, (-1, -1.0, time.monotonic()))

    def _ignored(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.folder)
        except ValueError:
            return True
        return rel.parts[0] == REJECTED or any(p.startswith(".") for p in rel.parts) or path.suffix in (".part", ".tmp")

    def _rescan(self) -> None:
        for path in self.folder.rglob("*"):
            self.notice(path)

    def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.wait(self.poll_s):
            if time.monotonic() - last_scan >= self.rescan_s:
                try:
                    self._rescan()
                except OSError as exc:  # the share went away for a moment: try again later
                    log.warning("inbox: cannot scan %s: %s", self.folder, exc)
                last_scan = time.monotonic()
            for path in self._settled():
                if self._stop.is_set():
                    return
                try:
                    self._take(path)
                except Exception:  # keep watching: one bad file must not stop the inbox
                    log.exception("inbox: could not take %s; will retry", path)
                    self.notice(path)

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        ready = []
        with self._lock:
            for path, (size, mtime, since) in list(self._seen.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._seen[path]
                    continue
                if (st.st_size, st.st_mtime) != (size, mtime):
                    self._seen[path] = (st.st_size, st.st_mtime, now)
                elif now - since >= self.settle_s:
                    ready.append(path)
                    del self._seen[path]
        return ready

    def _take(self, path: Path) -> None:
        source = Source("inbox", path.name)
        try:
            before = path.stat()
        except FileNotFoundError:
            return
        outcomes = []
        for outcome in import_items(self.archive, collect([path]), source):
            outcomes.append(outcome)
            if self._stop.is_set():  # shutting down in the middle of a zip: keep it for next time
                log.info("inbox: stopping; %s will be taken again at the next start", path.name)
                return
        try:
            after = path.stat()
        except FileNotFoundError:
            return
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
            # the sender wrote to it while we imported: what we stored may not be what
            # it will hold, so neither delete nor reject it; take it again once settled
            log.info("inbox: %s changed while being imported; will take it again", path.name)
            self.notice(path)
            return
        if any(o.status == "failed" for o in outcomes):
            # the archive could not write (disk full...): keep the file, retry later
            reason = next(o.reason for o in outcomes if o.status == "failed")
            log.error("inbox: %s not stored yet (%s); will retry", path.name, reason)
            self.notice(path)
            return
        rejected = [o for o in outcomes if o.status == "rejected"]
        if not rejected:
            path.unlink(missing_ok=True)
            log.info("inbox: stored %s (%d instance(s))", path.name, len(outcomes))
            return
        target = self._unique(self.rejected / path.name)
        shutil.move(str(path), target)
        reasons = "\n".join(f"{o.name}: {o.reason}" for o in rejected)
        reason = target.with_name(target.name + ".reason.txt")
        staging = target.with_name("." + reason.name + ".tmp")
        staging.write_text(reasons + "\n", encoding="utf-8")
        staging.replace(reason)  # whoever sees the reason file sees all of it
        log.warning("inbox: rejected %s: %s", path.name, rejected[0].reason)

    @staticmethod
    def _unique(target: Path) -> Path:
        candidate, n = target, 1
        while candidate.exists():
            candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        return candidate

