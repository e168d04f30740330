"""HTTP connections accepted one at a time on a socket the node's processes share.

asyncio's own server accepts every connection waiting on its socket at once (up to its
backlog), so the process that wakes first takes a whole burst: four STOW-RS clients that
connect together can all land in one process while the others idle. This site accepts
one connection per wake-up, and a process that serves more connections than another
leaves the next one to it (node/balance.py).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from aiohttp import web

from node.balance import ACCEPT_POLL_S, DEFER_ACCEPT_S, ConnectionCounts, waiting

log = logging.getLogger("dicomnode.http")

ACCEPT_RETRY_S = 1.0  # after the process ran out of file descriptors (EMFILE)


class BalancedSockSite(web.BaseSite):
    """aiohttp's ``SockSite`` for a listening socket other processes accept on too."""

    __slots__ = ("_sock", "_counts", "_name", "_loop", "_open", "_deferred", "_deadline")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, counts: ConnectionCounts) -> None:
        super().__init__(runner)
        self._sock = sock
        self._counts = counts
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = 0  # connections accepted here and not yet closed
        self._deferred: asyncio.TimerHandle | None = None  # while leaving a connection to the others
        self._deadline = 0.0

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        # aiohttp's server hears of every connection that ends (its request handlers
        # call it); counted down at once, so the other processes see it
        connection_lost = server.connection_lost

        def counting_connection_lost(handler: object, exc: BaseException | None = None) -> None:
            connection_lost(handler, exc)  # type: ignore[arg-type]
            self._closed()

        server.connection_lost = counting_connection_lost  # type: ignore[method-assign]
        self._counts.active = lambda: self._open
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._counts.update()

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self._sock.close()  # this process's copy: the others keep accepting on theirs
        await super().stop()

    # ------------------------------------------------------------------ inside
    def _readable(self) -> None:
        if self._counts.busier_than_another():  # leave it to a process serving fewer
            self._deadline = time.monotonic() + DEFER_ACCEPT_S
            self._pause(ACCEPT_POLL_S, self._left_to_another)
        else:
            self._accept()

    def _pause(self, seconds: float, then: Callable[[], None]) -> None:
        """Stop listening for ``seconds``, then call ``then``."""
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._deferred = self._loop.call_later(seconds, then)

    def _left_to_another(self) -> None:
        """Looked at every ``ACCEPT_POLL_S``: taken by another process, or accepted here
        once the wait is over."""
        assert self._loop is not None
        if waiting(self._sock) and time.monotonic() < self._deadline:
            self._deferred = self._loop.call_later(ACCEPT_POLL_S, self._left_to_another)
            return
        self._resume()

    def _resume(self) -> None:
        self._deferred = None
        assert self._loop is not None
        self._loop.add_reader(self._sock.fileno(), self._readable)
        if waiting(self._sock):
            self._accept()

    def _accept(self) -> None:
        assert self._loop is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it, or the client gave up
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: as asyncio does, wait and retry
            log.error("cannot accept HTTP connections: %s; trying again in %.0f s", exc, ACCEPT_RETRY_S)
            self._pause(ACCEPT_RETRY_S, self._resume)
            return
        conn.setblocking(False)
        self._open += 1
        self._counts.update()
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._runner.server, conn))
        task.add_done_callback(lambda done: self._connected(done, conn))

    def _connected(self, task: asyncio.Task, conn: socket.socket) -> None:
        if task.cancelled() or task.exception() is not None:  # never a connection of the server
            if not task.cancelled():
                log.warning("HTTP connection dropped while being set up: %s", task.exception())
            conn.close()
            self._closed()

    def _closed(self) -> None:
        self._open -= 1
        self._counts.update()


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` for the node's processes to share."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
