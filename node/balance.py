"""Connections spread evenly over the processes of the node.

With worker processes (cli/workers.py) every process accepts on the same listening
sockets, and the kernel hands a new connection to whichever process asks first. Left to
itself that is not an even spread: four clients connecting at once often leave one
process with two connections and another with none, and the two then share one
interpreter lock while a core idles.

Each process publishes how many connections it serves in shared memory
(:class:`ConnectionCounts`, one slot per process, written only by its owner; a process
that is starting, restarting or gone has no count). A process that serves more than
another one leaves a new connection to the less busy one: it waits until the connection
is taken, and accepts it itself if nobody did within :data:`DEFER_ACCEPT_S` (the other
process is stuck). The counts are hints: a connection is always accepted by someone.
"""
from __future__ import annotations

import multiprocessing
import select
import socket
import time
from typing import Any, Callable

DEFER_ACCEPT_S = 0.02  # longest a busier process leaves a new connection to the others
ACCEPT_POLL_S = 0.001  # how often it looks whether one of them took it
NOT_ACCEPTING = -1  # the count of a process that does not accept (yet)


class ConnectionCounts:
    """How many connections (DIMSE associations, or HTTP connections) each process of
    the node serves: one slot per process in shared memory."""

    def __init__(self, slots: Any, index: int) -> None:
        self.slots = slots  # multiprocessing RawArray('i', processes)
        self.index = index
        self.active: Callable[[], int] = lambda: 0  # this process's count, once serving

    @classmethod
    def shared(cls, processes: int) -> "ConnectionCounts":
        """The serving process's counts (slot 0), with a slot for each worker, which
        has no count until it publishes one."""
        slots = multiprocessing.get_context("spawn").RawArray("i", processes)
        for index in range(1, processes):
            slots[index] = NOT_ACCEPTING
        return cls(slots, 0)

    def update(self, closing: int = 0, opening: int = 0) -> None:
        """Publish this process's count: ``active`` less ``closing`` (connections it
        still counts that are ending right now), plus ``opening`` (accepted ones it does
        not count yet)."""
        self.slots[self.index] = max(0, self.active() - closing + opening)

    def accepted(self) -> None:
        """A connection was just accepted: count it before ``active`` does, so the next
        connection of a burst goes elsewhere."""
        self.slots[self.index] += 1

    def others(self) -> int:
        """Connections the other processes serve."""
        return sum(max(0, count) for i, count in enumerate(self.slots) if i != self.index)

    def busier_than_another(self) -> bool:
        """Does another process that accepts serve fewer connections than this one?"""
        own = self.slots[self.index]
        return any(0 <= count < own for i, count in enumerate(self.slots) if i != self.index)

    def clear(self, index: int) -> None:
        """A process that is gone serves nothing and accepts nothing."""
        self.slots[index] = NOT_ACCEPTING


def waiting(sock: socket.socket) -> bool:
    """Is a connection waiting to be accepted on the listening socket ``sock``? (poll,
    not select: any descriptor number will do)"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def left_to_another(sock: socket.socket, counts: ConnectionCounts) -> bool:
    """When another process serves fewer connections, give it up to ``DEFER_ACCEPT_S``
    to accept the connection waiting on ``sock``; True if it did. (A thread's version:
    it sleeps.)"""
    if not counts.busier_than_another():
        return False
    deadline = time.monotonic() + DEFER_ACCEPT_S
    while time.monotonic() < deadline:
        time.sleep(ACCEPT_POLL_S)
        if not waiting(sock):
            return True
    return False
