"""Association workers: more processes accepting DIMSE associations on the node's port.

One Python process receives C-STORE at about one CPU core's worth: with several
associations at once it is CPU-bound, and its threads spend their time handing the
GIL to one another. With ``[ae] workers = N`` the serving process starts N-1 worker
processes that accept on the same listening socket (inherited, not re-bound: the
kernel hands each connection to one process). Each worker runs its own pynetdicom AE
over the same archive folder and index, which are safe to share between processes
(per-process temp folders, a journal that names its owner, SQLite in WAL mode).

What must stay node-wide goes through the serving process:

- archive events (``instance stored``, UPS workitem events) are forwarded to it and
  emitted there, where the metadata prefill, the workitem bookkeeping, UPS event
  reports and UPS-RS subscribers listen; a worker's own event bus delivers nothing
  locally;
- counters are sent as increments once a second and added to its ``/metrics``;
- ``[ae] max_associations`` holds for the node: each process publishes how many
  associations it serves in shared memory, and refuses what would exceed the limit
  together with the others' (:class:`AssociationCounts`).

A worker that dies is restarted, after the serving process has finished or undone the
stores it had in flight (``Archive.repair(orphans_only=True)``): an instance it had
acknowledged is on disk and indexed. Workers stop when the serving process asks them
to, or when it is gone (their end of the pipe closes), finishing the associations in
flight first.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from config import Settings
from storage import Archive
from storage.events import EventBus
from storage.metrics import Metrics

log = logging.getLogger("dicomnode.node")

_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs threads
METRICS_EVERY_S = 1.0
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 15.0, 30.0)


class AssociationCounts:
    """How many associations each process of the node serves: one slot per process in
    shared memory, written only by its owner."""

    def __init__(self, slots: Any, index: int) -> None:
        self.slots = slots  # multiprocessing RawArray('i', processes)
        self.index = index
        self.active: Callable[[], int] = lambda: 0  # this process's count, once serving

    @classmethod
    def shared(cls, processes: int) -> "AssociationCounts":
        """The serving process's counts (slot 0), with a slot for each worker."""
        return cls(_SPAWN.RawArray("i", processes), 0)

    def update(self, closing: int = 0) -> None:
        """Publish this process's count (``closing``: connections ending right now)."""
        self.slots[self.index] = max(0, self.active() - closing)

    def others(self) -> int:
        return sum(self.slots) - self.slots[self.index]

    def clear(self, index: int) -> None:
        """A process that is gone serves nothing."""
        self.slots[index] = 0


class ForwardedEvents(EventBus):
    """A worker's event bus: every event goes to the serving process, none is delivered
    here (the subscribers that matter run there, once for the node)."""

    def __init__(self, link: "ParentLink") -> None:
        super().__init__()
        self.link = link

    def emit(self, event: Any) -> None:
        self.link.send("event", event)


class ParentLink:
    """A worker's end of its pipe: messages to the serving process, from any thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._sent: dict = {}

    def send(self, kind: str, payload: Any = None) -> None:
        try:
            with self._lock:
                self.conn.send((kind, payload))
        except (OSError, ValueError):
            pass  # the serving process is gone; the worker is stopping

    def send_metrics(self, metrics: Metrics) -> None:
        """Send the counters' increments since the last call."""
        counters = metrics.counters()
        deltas = {key: value - self._sent.get(key, 0) for key, value in counters.items()
                  if value != self._sent.get(key, 0)}
        if deltas:
            self.send("metrics", deltas)
            self._sent = counters


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process is started with (pickled to it)."""

    settings: Settings
    index: int
    open_archive: Callable[..., Archive]  # the composition root's, module-level
    log_level: int
    log_format: str
    logger_levels: tuple[tuple[str, int], ...] = ()


def run_worker(config: WorkerConfig, conn: Connection, listening: socket.socket, slots: Any) -> None:
    """A worker process's life: serve associations until told to stop."""
    from .server import DicomNode  # after the spawn, not when the serving process imports this

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the serving process, which stops us
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    logging.basicConfig(level=config.log_level, format=config.log_format)
    for name, level in config.logger_levels:
        logging.getLogger(name).setLevel(level)
    link = ParentLink(conn)
    archive = config.open_archive(config.settings, events=ForwardedEvents(link), repair=False)
    counts = AssociationCounts(slots, config.index)
    node = DicomNode(config.settings, archive, counts)
    node.start(listening_socket=listening, report_events=False)
    counts.active = lambda: len(node.active_associations())
    link.send("ready", os.getpid())
    log.info("worker %d (pid %d) accepting associations on port %d", config.index, os.getpid(), node.port)
    grace = 30.0
    while not stop.is_set():
        try:
            if conn.poll(METRICS_EVERY_S):
                kind, payload = conn.recv()
                if kind == "stop":
                    grace = payload
                    break
        except (EOFError, OSError):
            log.warning("worker %d: the serving process is gone; stopping", config.index)
            break
        counts.update()
        link.send_metrics(archive.metrics)
    node.stop(grace)
    counts.clear(config.index)
    archive.close()
    link.send_metrics(archive.metrics)
    link.send("stopped", os.getpid())


@dataclass
class _Worker:
    index: int
    process: Any = None
    conn: Connection | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    failures: int = 0


class WorkerPool:
    """The serving process's side: starts ``[ae] workers - 1`` worker processes on its
    listening socket, relays what they send, restarts the ones that die."""

    def __init__(self, settings: Settings, archive: Archive, listening: socket.socket,
                 counts: AssociationCounts, open_archive: Callable[..., Archive]) -> None:
        self.settings = settings
        self.archive = archive
        self.listening = listening
        self.counts = counts
        self.open_archive = open_archive
        self.workers = [_Worker(index) for index in range(1, settings.ae.workers)]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)
        thread = threading.Thread(target=self._publish_counts, name="association-counts", daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(w.ready.wait(max(0.0, deadline - time.monotonic())) for w in self.workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None and w.process.is_alive()]

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask every worker to stop (they finish their associations, up to ``grace_s``),
        wait for them, kill what is left."""
        self._stopping.set()
        for worker in self.workers:
            try:
                if worker.conn is not None:
                    worker.conn.send(("stop", grace_s))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace_s + 10
        for worker in self.workers:
            if worker.process is None:
                continue
            worker.process.join(max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.join(5)
        for thread in self._threads:
            thread.join(timeout=5)

    # ------------------------------------------------------------------ inside
    def _spawn(self, worker: _Worker) -> None:
        root = logging.getLogger()
        handler = root.handlers[0] if root.handlers else None
        fmt = getattr(getattr(handler, "formatter", None), "_fmt", None) or "%(asctime)s %(levelname)s %(name)s: %(message)s"
        levels = tuple((name, logging.getLogger(name).level) for name in ("pynetdicom", "dicomnode", "dicomnode.archive"))
        config = WorkerConfig(self.settings, worker.index, self.open_archive, root.level, fmt, levels)
        parent_conn, child_conn = _SPAWN.Pipe()
        process = _SPAWN.Process(target=run_worker, args=(config, child_conn, self.listening, self.counts.slots),
                                 name=f"dicomnode-worker-{worker.index}", daemon=False)
        process.start()
        child_conn.close()
        worker.process, worker.conn, worker.started_at = process, parent_conn, time.monotonic()
        worker.ready.clear()
        thread = threading.Thread(target=self._relay, args=(worker,), name=f"worker-{worker.index}-relay", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _relay(self, worker: _Worker) -> None:
        """Apply what the worker sends, until its pipe closes; then restart it unless
        the node is stopping."""
        conn = worker.conn
        assert conn is not None
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "event":
                self.archive.events.emit(payload)
            elif kind == "metrics":
                for (name, labels), amount in payload.items():
                    self.archive.metrics.inc(name, amount, **dict(labels))
            elif kind == "ready":
                worker.ready.set()
        conn.close()
        worker.process.join(timeout=30)
        self.counts.clear(worker.index)
        if self._stopping.is_set():
            return
        code = worker.process.exitcode
        log.error("worker %d (pid %d) ended unexpectedly (exit code %s): finishing its stores in flight, "
                  "then starting it again", worker.index, worker.process.pid, code)
        try:
            self.archive.repair(orphans_only=True)
        except Exception:
            log.exception("repair after worker %d ended failed; the next start of the node repairs", worker.index)
        ran_s = time.monotonic() - worker.started_at
        worker.failures = worker.failures + 1 if ran_s < 60 else 1
        delay = RESTART_DELAYS_S[min(worker.failures, len(RESTART_DELAYS_S)) - 1]
        if self._stopping.wait(delay):
            return
        self._spawn(worker)

    def _publish_counts(self) -> None:
        while not self._stopping.wait(0.5):
            self.counts.update()
