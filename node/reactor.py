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
  on the message queue instead of returning empty at once, and its loop
  (``EventDrivenAssociation._run_reactor``) no longer sleeps 1 ms on every pass; a
  peer's release or abort (the DUL's ``to_user_queue``) ends that wait at once;
- a C-STORE received straight into the archive (``EventDrivenDIMSE``) is served on the
  DUL thread that received it, while the association thread serves nothing.
- while such a C-STORE's dataset arrives, a P-DATA-TF PDU is read into a buffer the
  association keeps and its fragments go to the file from there
  (``EventDrivenDUL._read_data_pdu``). pynetdicom copies every byte four times or more
  on the way (into the PDU's bytearray, to ``bytes``, then in slices for the items and
  for each item's value), in fresh 128 KiB allocations the kernel has to zero.
- each association gets the node's presentation contexts as fresh objects sharing their
  UIDs (``fresh_contexts``), not a ``deepcopy`` that re-validates ~7,700 UIDs.

Both waits are bounded (``POLL_S`` for the DUL thread, ``IDLE_LOOK_S`` for the
association thread, which a release, an abort or ``kill()`` wakes at once), so timers
and kill flags are looked at as before. It is wired in through pynetdicom's public ``request_handler`` argument of
``ThreadedAssociationServer`` (see ``node/server.py``); requestor associations (C-MOVE
sub-operations) are pynetdicom's own.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
from typing import Any

from copy import deepcopy
from datetime import datetime

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_recv_handler
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

from .pdata import append_pdvs, max_fragment, writable_socket, write_or_close
from .commands import read_command_fields, store_request, store_rsp_command
from .store_receipt import StoreReceipt

_PYNETDICOM_LOG = logging.getLogger("pynetdicom")
_ASSOC_LOG = logging.getLogger("pynetdicom.association")  # pynetdicom's own loggers there
_DUL_LOG = logging.getLogger("pynetdicom.dul")
POLL_S = 0.005  # longest wait before timers and flags are looked at again
# the association thread's longest wait for a request: it is woken by requests, the
# peer's release or abort, and kill(); only its network-timeout check waits this long
IDLE_LOOK_S = 0.05


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
        # a release or abort from the peer, for the association thread
        self.to_user_queue = _WakingQueue(self._wake_association)

    def _wakeup(self) -> None:
        if not self._sleeping:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or already closed

    def _wake_association(self) -> None:
        """The association thread, if it waits for a DIMSE message, looks at once (a
        peer's A-RELEASE-RQ would wait up to ``IDLE_LOOK_S`` for its answer)."""
        dimse = getattr(self.assoc, "dimse", None)
        if isinstance(dimse, EventDrivenDIMSE):
            dimse.wake_reactor()

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
        # poll(), not select(): select() fails for descriptors above 1023, which a
        # busy node (many associations, HTTP clients, index files) reaches
        sock = getattr(self.socket, "socket", None)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if isinstance(sock, ssl.SSLSocket):
            poller.poll(1)  # TLS may buffer: keep polling
        else:
            fd = sock.fileno() if sock is not None else -1
            if fd >= 0:
                poller.register(fd, select.POLLIN)
            try:
                poller.poll(POLL_S * 1000)
            except OSError:  # the socket closed under us
                pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- P-DATA-TF PDUs of a dataset received straight into a file
    _buffer: bytearray | None = None

    def _read_pdu_data(self) -> None:
        """pynetdicom's read of the next PDU; :meth:`_read_data_pdu` instead while a
        C-STORE dataset is being received into a file and the PDU is a P-DATA-TF."""
        if not self._read_data_pdu():
            super()._read_pdu_data()

    def _read_data_pdu(self) -> bool:
        """Read a P-DATA-TF PDU into this association's buffer and hand the state
        machine a P-DATA primitive whose values are views into it, for
        ``EventDrivenDIMSE`` to write to the file being received (as it does with any
        P-DATA, on this thread, before the next PDU is read). False, having read
        nothing: not such a PDU, or something besides the file would keep the data
        (a TLS socket, another state, listeners for received PDUs)."""
        receipt = getattr(self.assoc.dimse, "_receipt", None)
        sock = getattr(self.socket, "socket", None)
        if (
            receipt is None or sock is None or isinstance(sock, ssl.SSLSocket)
            or self.state_machine.current_state != "Sta6" or self._pdu_listeners()
        ):
            return False
        try:
            header = sock.recv(6, socket.MSG_PEEK)
        except (OSError, TimeoutError):
            return False  # pynetdicom reads it and reports what is wrong
        if len(header) < 6 or header[0] != 0x04:
            return False
        length = int.from_bytes(header[2:6], "big")
        buffer = self._buffer
        if buffer is None or len(buffer) < 6 + length:
            buffer = bytearray(6 + length)
            if length <= _KEEP_BUFFER:
                self._buffer = buffer
        view = memoryview(buffer)[:6 + length]
        received = 0
        try:
            while received < len(view):
                count = sock.recv_into(view[received:])
                if not count:
                    break
                received += count
        except (OSError, TimeoutError):
            received = -1
        if received != len(view):
            # as pynetdicom: the connection closed (or failed) inside the PDU
            _DUL_LOG.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return True
        pdvs = _pdv_views(view[6:])
        if pdvs is None:
            _DUL_LOG.error("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return True
        self._recv_pdu.put(_ReceivedData(pdvs))
        self.event_queue.put("Evt10")
        return True

    def _pdu_listeners(self) -> bool:
        """Whether anything but pynetdicom's standard handler (which does nothing with a
        P-DATA-TF) listens to received PDUs or their bytes."""
        assoc = self.assoc
        return bool(assoc.get_handlers(evt.EVT_DATA_RECV)) or any(
            h is not standard_pdu_recv_handler for h, _ in assoc.get_handlers(evt.EVT_PDU_RECV)
        )

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
        _DUL_LOG.exception("Exception in DUL.run(), aborting association")
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


_KEEP_BUFFER = 4 * 1024 * 1024  # a PDU this long or shorter is read into the kept buffer


def _pdv_views(items: memoryview) -> list[tuple[int, memoryview]] | None:
    """The (context ID, value) of each presentation data value item of a P-DATA-TF
    PDU's body, as views (PS3.8 9.3.5.1); None if the items do not add up."""
    pdvs = []
    offset, end = 0, len(items)
    while offset < end:
        if end - offset < 6:
            return None
        length = int.from_bytes(items[offset:offset + 4], "big")
        if length < 2 or offset + 4 + length > end:
            return None
        pdvs.append((items[offset + 4], items[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return pdvs


class _ReceivedData:
    """What the state machine takes from ``_recv_pdu`` for a P-DATA-TF (action DT-2):
    an object whose ``to_primitive`` gives the P-DATA indication."""

    __slots__ = ("pdvs",)

    def __init__(self, pdvs: list[tuple[int, memoryview]]) -> None:
        self.pdvs = pdvs

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # (its setter wants lists: filled as pynetdicom does)
        primitive.presentation_data_value_list.extend(self.pdvs)
        return primitive


_FIND_RSP_FIELDS = tuple(_COMMAND_SET_KEYWORDS["C-FIND-RSP"])
_PENDING = (0xFF00, 0xFF01)


class EventDrivenDIMSE(DIMSEServiceProvider):
    """A non-blocking look for a DIMSE message (the association reactor's) waits up
    to ``IDLE_LOOK_S`` for one, so a request is served as soon as it is decoded.

    Pending C-FIND responses reuse their encoded command set: all the pending
    responses to one request have the same one, and pynetdicom builds a command set
    data set and encodes it twice per message (most of its per-result cost). The P-DATA
    primitives sent are those ``DIMSEMessage.encode_msg`` yields, built from the first
    response's command set as pynetdicom encoded it. Only while nothing but the quiet
    standard log handler listens to ``EVT_DIMSE_SENT`` (and its DEBUG log is off)."""

    _find_commands: dict[tuple, bytes]
    _receipt: StoreReceipt | None = None
    waiting = False  # the association thread waits in get_msg(block=False)

    # -- receiving: C-STORE-RQ datasets straight into the archive's temp folder
    def receive_primitive(self, primitive: Any) -> None:
        receipt = self._receipt
        pdvs = primitive.presentation_data_value_list
        if receipt is not None:
            self._continue_receipt(pdvs, receipt)
            return
        if self.message is None and pdvs:
            folder = getattr(self.assoc.ae, "dicomnode_receive_folder", None)
            context_id, data = pdvs[0]
            if folder is not None and data and data[0] & 0x03 == 0x03 and self._start_receipt(folder, context_id, data):
                if len(pdvs) > 1 and self._receipt is not None:  # dataset fragments in the same PDU
                    self._continue_receipt(pdvs[1:], self._receipt)
                return
        super().receive_primitive(primitive)

    def discard_receipt(self) -> None:
        """The association ended inside a dataset: its partial file goes."""
        receipt, self._receipt = self._receipt, None
        if receipt is not None:
            receipt.file.discard()

    def _start_receipt(self, folder: Any, context_id: int, data: bytes) -> bool:
        """A complete command set in one fragment: when it is a C-STORE-RQ with a
        dataset, start receiving that dataset into ``folder``; else leave it to pynetdicom."""
        command = memoryview(data)[1:]
        fields = read_command_fields(command)
        if fields is None or fields.get(0x0100) != b"\x01\x00" or fields.get(0x0800) == b"\x01\x01":
            return False
        cx = self.assoc._accepted_cx.get(context_id)
        request = store_request(fields)
        if cx is None or request is None:
            return False  # pynetdicom decodes it (and reports what is wrong)
        try:
            receipt = StoreReceipt(folder, context_id, bytes(command), request, cx.transfer_syntax[0],
                                   getattr(self.assoc.ae, "dicomnode_name_sync", None))
        except OSError:
            return False  # no file there (a full disk, say): pynetdicom's own way
        self._receipt = receipt
        return True

    def _continue_receipt(self, pdvs: list, receipt: StoreReceipt) -> None:
        for _, data in pdvs:
            header = data[0]
            if header & 0x01:
                # a command fragment inside a dataset: the peer broke PS3.8 E.2
                receipt.file.discard()
                self._receipt = None
                logging.getLogger("pynetdicom.dimse").error("Received an invalid DIMSE message")
                self.dul.event_queue.put("Evt19")
                return
            receipt.file.write(memoryview(data)[1:])
            if header & 0x02:
                self._finish_receipt(receipt)
                return

    def _finish_receipt(self, receipt: StoreReceipt) -> None:
        self._receipt = None
        receipt.file.finish()
        request = receipt.request
        if self._recv_listeners():
            # pynetdicom's message, for the listeners (its log lines, an application's)
            message = DIMSEMessage()
            message.encoded_command_set.write(receipt.command)
            message.context_id = receipt.context_id
            message.command_set = decode(message.encoded_command_set, True, True)
            message.__class__ = C_STORE_RQ
            message._data_set_file = receipt.file  # type: ignore[assignment]
            message._data_set_path = receipt.file.path
            evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        request._context_id = receipt.context_id
        request._dataset_path = receipt.file.path
        request._dataset_file = receipt.file
        if receipt.file.error is not None:
            request._dicomnode_receive_error = receipt.file.error  # handle_store answers 0xA700
        if not self._serve_here(request, receipt.context_id):
            self.msg_queue.put((receipt.context_id, request))

    def _serve_here(self, request: Any, context_id: int) -> bool:
        """Serve a received C-STORE on this thread, the DUL thread that received it,
        instead of handing it to the association thread (a queue, a wake-up, the GIL
        passed twice: about 4% of the CPU time of a 0.5 MB instance). Only while the
        association thread serves nothing (its lock: one request at a time writes to
        the connection) and has nothing queued; False: queue it as pynetdicom does."""
        assoc = self.assoc
        serving = getattr(assoc, "serving", None)
        if serving is None or not assoc.is_established or not assoc._reactor_checkpoint.is_set():
            return False
        if self.msg_queue.qsize() or not serving.acquire(blocking=False):
            return False
        try:
            assoc._serve_request(request, context_id)
        finally:
            serving.release()
        return True

    def _recv_listeners(self) -> bool:
        """Whether ``EVT_DIMSE_RECV`` has a listener that does anything: pynetdicom's
        standard handler only formats log lines (INFO and DEBUG) for a C-STORE-RQ."""
        if _PYNETDICOM_LOG.isEnabledFor(logging.INFO):
            return True
        return any(h is not standard_dimse_recv_handler for h, _ in self.assoc.get_handlers(evt.EVT_DIMSE_RECV))

    # -- sending
    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and getattr(primitive, "ErrorID", None) is None
            and primitive.Status is not None
            and self._only_quiet_listeners()
        ):
            command = store_rsp_command(
                primitive.MessageIDBeingRespondedTo, primitive.Status,
                primitive.AffectedSOPClassUID or "", primitive.AffectedSOPInstanceUID or "",
            )
            self.send_pdvs(context_id, ((command, 0x01),))
            return
        if (
            type(primitive) is C_FIND
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status in _PENDING
            and primitive.Identifier is not None
            and getattr(primitive, "_dataset_path", None) is None
            and self._only_quiet_listeners()
        ):
            data = primitive.Identifier.getvalue()
            if data:
                self._send_find_pending(primitive, context_id, data)
                return
        super().send_msg(primitive, context_id)

    def _only_quiet_listeners(self) -> bool:
        if _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
            return False
        return all(h is quiet_dimse_sent_handler for h, _ in self.assoc.get_handlers(evt.EVT_DIMSE_SENT))

    def _send_find_pending(self, primitive: Any, context_id: int, data: bytes) -> None:
        cache = self.__dict__.setdefault("_find_commands", {})
        key = (context_id, *(getattr(primitive, name, None) for name in _FIND_RSP_FIELDS if name != "Identifier"))
        command = cache.get(key)
        if command is None:
            message = C_FIND_RSP()
            message.primitive_to_message(primitive)
            command = encode(message.command_set, True, True)
            if len(cache) > 64:
                cache.clear()
            cache[key] = command
        self.send_pdvs(context_id, ((command, 0x01), (data, 0x00)))

    def send_pdvs(self, context_id: int, parts: tuple[tuple[bytes | memoryview, int], ...]) -> bool:
        """Send each (value, 0x01 for a command or 0x00 for a dataset) of a message as
        P-DATA: straight to the socket when this thread is its only writer
        (``node/pdata.py``), else as primitives for the DUL thread. False when the
        connection broke."""
        max_pdu = self.maximum_pdu_size
        sock = writable_socket(self.assoc)
        if sock is not None:  # no hand-over to the DUL thread
            buffers: list = []
            for value, header in parts:
                append_pdvs(buffers, context_id, value, bool(header & 0x01), max_fragment(max_pdu))
            return write_or_close(self.assoc, sock, buffers)
        for value, header in parts:
            fragments = list(DIMSEMessage._generate_pdv_fragments(value, max_pdu))
            last = len(fragments) - 1
            for n, fragment in enumerate(fragments):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append(
                    (context_id, bytes((header | (0x02 if n == last else 0x00),)) + fragment)
                )
                self.dul.send_pdu(pdata)
        return True

    def wake_reactor(self) -> None:
        """If the association thread waits for a DIMSE message, it looks again at once."""
        if self.waiting:
            self.msg_queue.put((None, None))  # what an empty look returns

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        self.waiting = True
        try:
            return self.msg_queue.get(block=True, timeout=IDLE_LOOK_S)
        except queue.Empty:
            return None, None
        finally:
            self.waiting = False


def quiet_dimse_sent_handler(event: Any) -> list[str]:
    """pynetdicom's standard ``EVT_DIMSE_SENT`` log handler, except for C-FIND
    responses while its DEBUG log is off: for those it only formats DEBUG lines (eight
    strings per result, whatever the log level)."""
    if type(event.message) in (C_FIND_RSP, C_STORE_RSP) and not _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
        return []
    return standard_dimse_sent_handler(event)


class EventDrivenAssociation(Association):
    """An acceptor association whose threads wait on events, not on sleeps."""

    dimse_class: type = EventDrivenDIMSE

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        self.dimse = self.dimse_class(self)
        self.serving = threading.Lock()  # held while a request is served, by either thread
        self.quiet_find_logging()

    def run(self) -> None:
        # served associations are foreground work: the archive's background tasks stand
        # back meanwhile (storage/activity.py)
        foreground = getattr(self.ae, "dicomnode_foreground", None)
        if foreground is not None:
            foreground.begin()
        try:
            super().run()
        finally:
            self.dimse.discard_receipt()  # aborted or closed in the middle of a dataset
            if foreground is not None:
                foreground.end()

    def kill(self) -> None:
        super().kill()
        self.dimse.wake_reactor()  # it ends on its next look

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop (association.py ``_run_reactor``) without
        its ``time.sleep(0.001)`` at the top of every pass: the look for a message
        (``EventDrivenDIMSE.get_msg``) already waits for one, up to ``IDLE_LOOK_S``,
        so a request that is ready is served at once."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                with self.serving:
                    self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _ASSOC_LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)  # EVT_ASCE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def quiet_find_logging(self) -> None:
        """Swap pynetdicom's standard EVT_DIMSE_SENT log handler for
        :func:`quiet_dimse_sent_handler` (again after the server's handlers are bound)."""
        if any(h is standard_dimse_sent_handler for h, _ in self.get_handlers(evt.EVT_DIMSE_SENT)):
            self.unbind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
            if not any(h is quiet_dimse_sent_handler for h, _ in self.get_handlers(evt.EVT_DIMSE_SENT)):
                self.bind(evt.EVT_DIMSE_SENT, quiet_dimse_sent_handler)
        # the timeouts live partly in the DUL's timers: apply them to the new one
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class BulkRecvSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU in as few ``recv_into`` calls
    as the kernel allows instead of 4 KiB ``recv`` calls appended one by one (32 calls
    and copies for a 128 KiB P-DATA-TF PDU), and asking whether data is waiting with
    ``poll()`` instead of ``select()``, which fails for descriptors above 1023 (and
    pynetdicom then takes the connection for closed)."""

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: the transport connection closed
            return False

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = sock.recv_into(view[received:], nr_bytes - received)
            if not count:
                del view
                del buffer[received:]  # the peer closed: what arrived, as pynetdicom returns it
                return buffer
            received += count
        return buffer


def fresh_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Presentation contexts of their own for one association, as pynetdicom's handler
    gets them from ``deepcopy``, but sharing the UIDs in them (immutable strings): a
    deepcopy re-creates and re-validates each one. With every storage SOP class and
    every transfer syntax supported that is ~7,700 UIDs, ~33 ms of CPU before each
    association is negotiated (an echo, a worklist query, a modality's study). The
    transfer syntax list is copied; anything else that is not a plain value is
    deep-copied as before."""
    fresh = []
    for cx in contexts:
        copied = PresentationContext.__new__(PresentationContext)
        for name, value in vars(cx).items():
            if name == "_transfer_syntax":
                value = list(value)
            elif not isinstance(value, (str, int, type(None))):  # str: UIDs; int: bools too
                value = deepcopy(value)
            copied.__dict__[name] = value
        fresh.append(copied)
    return fresh


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating :class:`EventDrivenAssociation`
    (the body of pynetdicom 3.0.4's ``RequestHandler._create_association`` with the
    class swapped)."""

    association_class: type = EventDrivenAssociation

    def _create_association(self) -> Association:
        assoc = self.association_class(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BulkRecvSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = fresh_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])
        assoc.quiet_find_logging()
        return assoc
