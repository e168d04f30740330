"""The composition root: settings -> archive -> DIMSE node + HTTP app (+ inbox), run
together in one process until SIGINT/SIGTERM, then stopped in order."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from aiohttp import web

from config import Settings
from dicomweb import create_app
from dicomweb.keys import API_LIMITER, LOGIN_LIMITER
from dicomweb.wado import metadata_prefill
from node import DicomNode
from node.balance import ConnectionCounts
from storage import Archive, ArchiveError
from storage.events import EventBus
from storage.inbox import Inbox
from storage.metadata_cache import MetadataPrefill
from storage.metrics import Metrics

from .http_accept import BalancedSockSite, listening_socket
from .workers import WorkerPool

log = logging.getLogger("dicomnode")


class StartupError(Exception):
    """The node cannot start (a port in use...); the message names the fix."""


def open_archive(settings: Settings, events: EventBus | None = None, repair: bool = True,
                 metrics: Metrics | None = None) -> Archive:
    """The archive of ``settings``; ``events``, ``repair`` and ``metrics`` are for worker
    processes (cli/workers.py), which relay their events and counters and join a node
    already repaired."""
    try:
        return Archive(
            settings.storage.path,
            uid_root=settings.ae.uid_root,
            stable_after_s=settings.storage.stable_after_s,
            events=events,
            repair=repair,
            metrics=metrics,
        )
    except (OSError, ArchiveError) as exc:
        raise StartupError(
            f"cannot open the archive at {settings.storage.path}: {getattr(exc, 'message', None) or exc}. "
            "Check [storage] path in ae.toml or --data: it must be a folder this user can write"
        ) from exc


@dataclass
class Running:
    """A started node: what tests and ``serve`` hold on to."""

    settings: Settings
    archive: Archive
    node: DicomNode
    runner: web.AppRunner
    inbox: Inbox | None
    http_port: int
    metadata_prefill: MetadataPrefill | None = None
    workers: WorkerPool | None = None

    async def stop(self, grace_s: float = 30.0) -> None:
        log.info("shutting down: no new associations or requests")
        loop = asyncio.get_running_loop()
        # the workers stop side by side with this process's own associations and requests
        workers_stopped = loop.run_in_executor(None, self.workers.stop, grace_s) if self.workers else None
        await self.runner.cleanup()  # stops accepting, lets requests in flight finish
        await loop.run_in_executor(None, self.node.stop, grace_s)
        if workers_stopped is not None:
            await workers_stopped
        if self.inbox is not None:
            await loop.run_in_executor(None, self.inbox.stop)
        if self.metadata_prefill is not None:
            await loop.run_in_executor(None, self.metadata_prefill.close)
        self.archive.close()
        log.info("stopped cleanly")


def _port_error(what: str, host: str, port: int, exc: OSError, key: str, flag: str) -> StartupError:
    return StartupError(
        f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}. Another process "
        f"(perhaps another dicomnode) is using the port: stop it, or change {key} in ae.toml, "
        f"or pass {flag}"
    )


async def start(settings: Settings) -> Running:
    started = time.perf_counter()
    archive = open_archive(settings)
    archive.start_stability_monitor()
    # builds /metadata cache entries of new instances in the background
    prefill = metadata_prefill(archive).subscribe()
    counts = ConnectionCounts.shared(settings.ae.workers) if settings.ae.workers > 1 else None
    node = DicomNode(settings, archive, counts)
    try:
        node.start()
    except OSError as exc:
        prefill.close()
        archive.close()
        raise _port_error("DIMSE", settings.ae.host, settings.ae.port, exc, "[ae] port", "--ae-port") from exc
    app = create_app(settings, archive)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
    await runner.setup()
    # with HTTP worker processes, every process accepts on one socket, one connection at
    # a time, and the least busy first (cli/http_accept.py)
    http_counts = ConnectionCounts.shared(settings.http.workers) if settings.http.workers > 1 else None
    try:
        if http_counts is None:
            site: web.BaseSite = web.TCPSite(runner, settings.http.host, settings.http.port)
            await site.start()
            http_socket = site._server.sockets[0]  # type: ignore[attr-defined]
        else:
            http_socket = listening_socket(settings.http.host, settings.http.port)
            await BalancedSockSite(runner, http_socket, http_counts).start()
    except OSError as exc:
        await runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, node.stop, 0)
        prefill.close()
        archive.close()
        raise _port_error("HTTP", settings.http.host, settings.http.port, exc, "[http] port",
                          "--http-port") from exc
    http_port = http_socket.getsockname()[1]
    inbox = None
    if settings.inbox.path is not None:
        inbox = Inbox(settings.inbox.path, archive, settle_s=settings.inbox.settle_s)
        try:
            inbox.start()
        except OSError as exc:
            inbox.stop()
            await runner.cleanup()
            await asyncio.get_running_loop().run_in_executor(None, node.stop, 0)
            prefill.close()
            archive.close()
            raise StartupError(
                f"cannot watch the inbox {settings.inbox.path}: {exc}. Check [inbox] path in ae.toml: "
                "it must be a folder this user can read and write"
            ) from exc
    workers = None
    if max(settings.ae.workers, settings.http.workers) > 1:
        assert node.server is not None
        workers = WorkerPool(
            settings, archive, open_archive=open_archive,
            dimse_socket=node.server.socket if counts is not None else None, counts=counts,
            http_socket=socket.socket(fileno=os.dup(http_socket.fileno())) if http_counts is not None else None,
            http_counts=http_counts,
            rate_limiters={"login": app[LOGIN_LIMITER], "api": app[API_LIMITER]},
        )
        workers.start()  # they join as they are ready; this process serves meanwhile
    stored = archive.counts()
    log.info(
        "dicomnode ready in %.2f s: AE %s on %s:%d%s, HTTP on http://%s:%d%s, archive %s (%d instances)",
        time.perf_counter() - started, settings.ae.title, settings.ae.host, node.port,
        f" ({settings.ae.workers} processes)" if settings.ae.workers > 1 else "",
        settings.http.host, http_port, f" ({settings.http.workers} processes)" if settings.http.workers > 1 else "",
        settings.storage.path, stored["instances"],
    )
    return Running(settings, archive, node, runner, inbox, http_port, prefill, workers)


async def serve_forever(settings: Settings) -> None:
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
