"""Worker processes: more processes serving the node's DIMSE and HTTP ports.

One Python process receives at about one CPU core's worth: with several associations
or uploads at once it is CPU-bound, and its threads spend their time handing the GIL to
one another. With ``[ae] workers = N`` and/or ``[http] workers = M`` the serving
process (the one ``dicomnode serve`` started) starts ``max(N, M) - 1`` worker processes.
Worker ``i`` accepts associations when ``i < N`` and HTTP connections when ``i < M``, on
the serving process's own listening sockets (inherited, not re-bound: the kernel hands
each connection to one process; a process serving more connections than another lets
that one take the next, node/balance.py). Each worker opens the same archive folder and
index, which are safe to share between processes (per-process temp folders, a journal
that names its owner, SQLite in WAL mode).

What must stay node-wide goes through the serving process, over each worker's pipe:

- archive events: a worker's (``instance stored``, UPS workitem events) are emitted
  in the serving process, where the metadata prefill and UPS event reports listen;
  workitem events are sent on to every HTTP worker for its UPS-RS WebSocket channels.
  A worker's own event bus delivers nothing else locally;
- counters are sent as increments once a second and added to the serving process's;
  ``/metrics`` answered by a worker is rendered there, so it is the node's;
- rate limits (API-key plans, login attempts) are counted there: a worker asks it;
- ``[ae] max_associations`` holds for the node: each process publishes how many
  associations it serves in shared memory (``node.balance.ConnectionCounts``).

A worker that dies is restarted, after the serving process has finished or undone the
stores it had in flight (``Archive.repair(orphans_only=True)``): an instance it had
acknowledged is on disk and indexed. Workers stop when the serving process asks them
to, or when it is gone (their end of the pipe closes), finishing the associations and
requests in flight first.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from config import Settings
from node.balance import ConnectionCounts
from storage import Archive
from storage.events import EventBus
from storage.metrics import Metrics
from storage.workitem_model import WorkitemEvent

from .http_accept import BalancedSockSite

log = logging.getLogger("dicomnode.workers")

_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs threads
METRICS_EVERY_S = 1.0
CALL_TIMEOUT_S = 10.0
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 15.0, 30.0)


class PipeEnd:
    """One end of a worker's pipe, written from any thread. A message to a process that
    is gone is dropped: it is stopping, or being started again."""

    def __init__(self, conn: Connection) -> None:
        self.conn: Connection | None = conn
        self._lock = threading.Lock()

    def send(self, kind: str, payload: Any = None) -> None:
        try:
            with self._lock:
                if self.conn is not None:
                    self.conn.send((kind, payload))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# ---------------------------------------------------------------- in a worker


class ParentLink(PipeEnd):
    """A worker's end of its pipe: messages to the serving process from any thread,
    and calls that wait for its answer."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._sent: dict = {}
        self._ids = itertools.count(1)
        self._calls: dict[int, Future] = {}

    def call(self, kind: str, *args: Any) -> Any:
        """Ask the serving process; its answer, or RuntimeError if it does not answer."""
        call_id = next(self._ids)
        answer: Future = Future()
        self._calls[call_id] = answer
        try:
            self.send("call", (call_id, kind, args))
            return answer.result(CALL_TIMEOUT_S)
        except TimeoutError as exc:
            raise RuntimeError(f"the serving process did not answer {kind!r}") from exc
        finally:
            self._calls.pop(call_id, None)

    def answered(self, call_id: int, ok: bool, value: Any) -> None:
        answer = self._calls.get(call_id)
        if answer is not None and not answer.done():
            if ok:
                answer.set_result(value)
            else:
                answer.set_exception(RuntimeError(value))

    def fail_calls(self) -> None:
        for answer in list(self._calls.values()):
            if not answer.done():
                answer.set_exception(RuntimeError("the serving process is gone"))

    def send_metrics(self, metrics: Metrics) -> None:
        """Send the counters' increments since the last call."""
        counters = metrics.counters()
        deltas = {key: value - self._sent.get(key, 0) for key, value in counters.items()
                  if value != self._sent.get(key, 0)}
        if deltas:
            self.send("metrics", deltas)
            self._sent = counters


class ForwardedEvents(EventBus):
    """A worker's event bus: every event goes to the serving process, which emits it
    for the node; what it sends back (:meth:`deliver`) reaches the local subscribers."""

    def __init__(self, link: ParentLink) -> None:
        super().__init__()
        self.link = link

    def emit(self, event: Any) -> None:
        self.link.send("event", event)

    def deliver(self, event: Any) -> None:
        super().emit(event)


class NodeMetrics(Metrics):
    """A worker's counters: kept here and sent on; rendered by the serving process,
    which holds the node's (this process's increments included)."""

    def __init__(self, link: ParentLink) -> None:
        super().__init__()
        self.link = link

    def render(self) -> str:
        self.link.send_metrics(self)
        return self.link.call("metrics")


class NodeRateLimiter:
    """A rate limiter of the serving process (``name``), asked for every call."""

    def __init__(self, link: ParentLink, name: str) -> None:
        self.link = link
        self.name = name

    def retry_after(self, credential: str, per_window: int | None) -> int | None:
        if per_window is None:
            return None
        return self.link.call("retry_after", self.name, credential, per_window)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process is started with (pickled to it)."""

    settings: Settings
    index: int
    open_archive: Callable[..., Archive]  # the composition root's, module-level
    log_level: int
    log_format: str
    logger_levels: tuple[tuple[str, int], ...] = ()


def run_worker(config: WorkerConfig, conn: Connection, dimse_socket: socket.socket | None,
               http_socket: socket.socket | None, slots: Any, http_slots: Any) -> None:
    """A worker process's life: serve until told to stop, or until the serving process
    is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the serving process, which stops us
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    logging.basicConfig(level=config.log_level, format=config.log_format)
    for name, level in config.logger_levels:
        logging.getLogger(name).setLevel(level)
    link = ParentLink(conn)
    events = ForwardedEvents(link)
    grace = [30.0]

    def read_pipe() -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                if not stop.is_set():
                    log.warning("worker %d: the serving process is gone; stopping", config.index)
                break
            if kind == "stop":
                grace[0] = payload
                break
            if kind == "answer":
                link.answered(*payload)
            elif kind == "event":
                events.deliver(payload)
        stop.set()
        link.fail_calls()

    archive = config.open_archive(config.settings, events=events, repair=False, metrics=NodeMetrics(link))
    threading.Thread(target=read_pipe, name="serving-process-pipe", daemon=True).start()
    node = None
    counts = None
    if dimse_socket is not None:
        from node import DicomNode  # after the spawn, not when the serving process imports this

        counts = ConnectionCounts(slots, config.index)
        node = DicomNode(config.settings, archive, counts)
        node.start(listening_socket=dimse_socket, report_events=False)
        counts.update()  # accepting: the other processes may leave connections to this one

    def tick() -> None:  # once a second
        if counts is not None:
            counts.update()
        link.send_metrics(archive.metrics)

    serves = " and ".join(name for name, sock in (("DIMSE", dimse_socket), ("HTTP", http_socket)) if sock)
    try:
        if http_socket is not None:
            http_counts = ConnectionCounts(http_slots, config.index)
            asyncio.run(_serve_http(config, archive, link, http_socket, http_counts, stop, grace, tick, serves,
                                    node))
        else:
            link.send("ready", os.getpid())
            log.info("worker %d (pid %d) serving %s", config.index, os.getpid(), serves)
            while not stop.wait(METRICS_EVERY_S):
                tick()
    finally:
        if node is not None:
            node.stop(grace[0])  # once only: a second call returns at once
        if counts is not None:
            counts.clear(config.index)
        archive.close()
        link.send_metrics(archive.metrics)
        link.send("stopped", os.getpid())


async def _serve_http(config: WorkerConfig, archive: Archive, link: ParentLink, sock: socket.socket,
                      counts: ConnectionCounts, stop: threading.Event, grace: list[float],
                      tick: Callable[[], None], serves: str, node: Any) -> None:
    """The HTTP side of a worker: the node's app on the inherited socket, until ``stop``;
    then its requests and ``node``'s associations (if it serves DIMSE too) finish side by
    side."""
    from aiohttp import web

    from dicomweb import create_app

    limiters = {name: NodeRateLimiter(link, name) for name in ("login", "api")}
    app = create_app(config.settings, archive, rate_limiters=limiters)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace[0])
    await runner.setup()
    await BalancedSockSite(runner, sock, counts).start()
    link.send("ready", os.getpid())
    log.info("worker %d (pid %d) serving %s", config.index, os.getpid(), serves)
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            await loop.run_in_executor(None, stop.wait, METRICS_EVERY_S)
            tick()
    finally:
        associations_done = loop.run_in_executor(None, node.stop, grace[0]) if node is not None else None
        await runner.cleanup()  # requests in flight finish
        if associations_done is not None:
            await associations_done


# ---------------------------------------------------------------- in the serving process


@dataclass
class _Worker:
    index: int
    process: Any = None
    pipe: PipeEnd | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    failures: int = 0

    def send(self, kind: str, payload: Any) -> None:
        if self.pipe is not None:
            self.pipe.send(kind, payload)


class WorkerPool:
    """The serving process's side: starts the worker processes on its listening
    sockets, relays what they send, answers what they ask, restarts the ones that die."""

    def __init__(self, settings: Settings, archive: Archive, *, open_archive: Callable[..., Archive],
                 dimse_socket: socket.socket | None, counts: ConnectionCounts | None,
                 http_socket: socket.socket | None, http_counts: ConnectionCounts | None = None,
                 rate_limiters: dict[str, Any]) -> None:
        self.settings = settings
        self.archive = archive
        self.open_archive = open_archive
        self.dimse_socket = dimse_socket
        self.counts = counts
        self.http_socket = http_socket
        self.http_counts = http_counts
        self.rate_limiters = rate_limiters
        processes = max(settings.ae.workers, settings.http.workers)
        self.workers = [_Worker(index) for index in range(1, processes)]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._unsubscribe: Callable[[], None] | None = None
        self.relayed: Counter[str] = Counter()  # counter increments the workers sent, by name

    def start(self) -> None:
        if self.http_socket is not None:  # UPS-RS channels live in every HTTP process
            self._unsubscribe = self.archive.events.subscribe(WorkitemEvent, self._broadcast)
        for worker in self.workers:
            self._spawn(worker)
        if self.counts is not None:
            thread = threading.Thread(target=self._publish_counts, name="association-counts", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(w.ready.wait(max(0.0, deadline - time.monotonic())) for w in self.workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None and w.process.is_alive()]

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask every worker to stop (they finish their associations and requests, up to
        ``grace_s``), wait for them, kill what is left."""
        self._stopping.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        for worker in self.workers:
            worker.send("stop", grace_s)
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
        if self.http_socket is not None:
            self.http_socket.close()  # this process's copy, for starting workers

    # ------------------------------------------------------------------ inside
    def _spawn(self, worker: _Worker) -> None:
        root = logging.getLogger()
        handler = root.handlers[0] if root.handlers else None
        fmt = (getattr(getattr(handler, "formatter", None), "_fmt", None)
               or "%(asctime)s %(levelname)s %(name)s: %(message)s")
        levels = tuple((name, logging.getLogger(name).level)
                       for name in ("pynetdicom", "dicomnode", "dicomnode.archive", "aiohttp.access"))
        config = WorkerConfig(self.settings, worker.index, self.open_archive, root.level, fmt, levels)
        dimse = self.dimse_socket if worker.index < self.settings.ae.workers else None
        http = self.http_socket if worker.index < self.settings.http.workers else None
        parent_conn, child_conn = _SPAWN.Pipe()
        slots = self.counts.slots if self.counts is not None else None
        http_slots = self.http_counts.slots if self.http_counts is not None else None
        process = _SPAWN.Process(target=run_worker, args=(config, child_conn, dimse, http, slots, http_slots),
                                 name=f"dicomnode-worker-{worker.index}", daemon=False)
        process.start()
        child_conn.close()
        worker.process, worker.pipe, worker.started_at = process, PipeEnd(parent_conn), time.monotonic()
        worker.ready.clear()
        if self._stopping.is_set():  # stop() came while this one was starting: it missed the word
            worker.send("stop", 0.0)
        thread = threading.Thread(target=self._relay, args=(worker,), name=f"worker-{worker.index}-relay",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _relay(self, worker: _Worker) -> None:
        """Apply what the worker sends, until its pipe closes; then restart it unless
        the node is stopping."""
        assert worker.pipe is not None and worker.pipe.conn is not None
        pipe, conn = worker.pipe, worker.pipe.conn
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
                    self.relayed[name] += amount
            elif kind == "call":
                call_id, what, args = payload
                try:
                    worker.send("answer", (call_id, True, self._answer(what, args)))
                except Exception as exc:
                    log.exception("worker %d asked %r", worker.index, what)
                    worker.send("answer", (call_id, False, str(exc)))
            elif kind == "ready":
                worker.ready.set()
        pipe.close()
        worker.process.join(timeout=30)
        for counts in (self.counts, self.http_counts):
            if counts is not None and worker.index < len(counts.slots):
                counts.clear(worker.index)
        if self._stopping.is_set():
            return
        log.error("worker %d (pid %d) ended unexpectedly (exit code %s): finishing its stores in flight, "
                  "then starting it again", worker.index, worker.process.pid, worker.process.exitcode)
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

    def _answer(self, what: str, args: tuple) -> Any:
        if what == "retry_after":
            name, credential, per_window = args
            return self.rate_limiters[name].retry_after(credential, per_window)
        if what == "metrics":
            return self.archive.metrics.render()
        raise ValueError(f"unknown question {what!r}")

    def _broadcast(self, event: WorkitemEvent) -> None:
        for worker in self.workers:
            if worker.index < self.settings.http.workers:
                worker.send("event", event)

    def _publish_counts(self) -> None:
        assert self.counts is not None
        while not self._stopping.wait(0.5):
            self.counts.update()
