"""Event-driven waiting for the associations this node accepts.

pynetdicom 3.0.4 runs two threads per association that poll: the DUL reactor
(``DULServiceProvider.run_reactor``) sleeps 1 ms whenever a pass found nothing to do,
and the association reactor (``Association._run_reactor``) sleeps 1 ms on every pass
before looking for a decoded DIMSE message. Under load every C-STORE waits up to a
millisecond twice (request picked up, response sent) and every C-FIND response up to a
millisecond; with several associations the sleeping threads fight for the GIL.

This layer keeps all of pynetdicom's protocol code (state machine, PDU and DIMSE
decoding, ACSE) and changes only how the threads wait:

- the DUL thread blocks in ``select()`` on its socket and on a wake-up pipe that its
  two input queues (primitives to send, state-machine events) signal on ``put``;
- the association thread's non-blocking look for a DIMSE message waits for one briefly
  on the message queue instead of returning empty at once.

Both waits are bounded (``POLL_S``), so timers, kill flags and release/abort checks run
as before. It is wired in through pynetdicom's public ``request_handler`` argument of
``ThreadedAssociationServer`` (see ``node/server.py``); requestor associations (C-MOVE
sub-operations) are pynetdicom's own.
"""
from __future__ import annotations

import os
import queue
import select
import ssl
from typing import Any

from copy import deepcopy
from datetime import datetime

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

POLL_S = 0.005  # longest wait before timers and flags are looked at again


class _WakingQueue(queue.Queue):
    """A queue that signals a wake-up function after every ``put``."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in ``select()`` instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # True only while the DUL thread is (about to be) blocked in select(): a put
        # writes to the pipe only then, not for every PDU of a stream of C-FIND
        # responses (each write a syscall and a GIL hand-over to a thread that is busy
        # anyway and would find the item on its next pass).
        self._sleeping = False
        self.event_queue = _WakingQueue(self._wakeup)
        self.to_provider_queue = _WakingQueue(self._wakeup)

    def _wakeup(self) -> None:
        if not self._sleeping:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or already closed

    def _wait(self) -> None:
        """Until the socket is readable, a queue was fed, or ``POLL_S`` passed."""
        self._sleeping = True
        try:
            # a put between the loop's last look and the flag did not signal: look again
            if self.to_provider_queue.qsize() or self.event_queue.qsize():
                return
            self._select()
        finally:
            self._sleeping = False

    def _select(self) -> None:
        sock = getattr(self.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket):
            select.select([self._wake_r], [], [], 0.001)  # TLS may buffer: keep polling
        else:
            waitables = [self._wake_r] if sock is None else [self._wake_r, sock]
            try:
                select.select(waitables, [], [], POLL_S)
            except (OSError, ValueError):  # the socket closed under us
                select.select([self._wake_r], [], [], POLL_S)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def run_reactor(self) -> None:
        """pynetdicom's loop (dul.py ``run_reactor``), with ``_wait`` for its sleep."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        busy = True
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                        busy = True
                    else:
                        busy = False
                except Exception:
                    self._abort_on_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    if not busy:
                        self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _abort_on_error(self) -> None:
        """As pynetdicom does: send an A-ABORT bypassing the state machine, stop both
        reactors."""
        import logging

        log = logging.getLogger("pynetdicom.dul")
        log.exception("Exception in DUL.run(), aborting association")
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
        except Exception:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class EventDrivenDIMSE(DIMSEServiceProvider):
    """A non-blocking look for a DIMSE message (the association reactor's) waits up
    to ``POLL_S`` for one, so a request is served as soon as it is decoded."""

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(block=True, timeout=POLL_S)
        except queue.Empty:
            return None, None


class EventDrivenAssociation(Association):
    """An acceptor association whose threads wait on events, not on sleeps."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        self.dimse = EventDrivenDIMSE(self)
        # the timeouts live partly in the DUL's timers: apply them to the new one
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating :class:`EventDrivenAssociation`
    (the body of pynetdicom 3.0.4's ``RequestHandler._create_association`` with the
    class swapped)."""

    def _create_association(self) -> Association:
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
