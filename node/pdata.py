"""P-DATA-TF PDUs written by the thread that serves a request, straight to the socket.

pynetdicom hands every PDU to the association's DUL thread (a queue, a wake-up, a GIL
hand-over) to be encoded and sent. A thread serving a request that is the only writer
of the association (:func:`writable_socket` says when) may build the PDUs itself,
headers and slices of the values without copies (:func:`append_pdvs`), and send them
with one ``sendmsg`` (:func:`send_buffers`): C-STORE responses, C-FIND and retrieve
pending responses, C-GET sub-operations.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_sent_handler

_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

P_DATA_TF = 0x04
UNLIMITED_FRAGMENT = 1 << 20  # PDV size when the peer sets no maximum PDU length
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """All of ``buffers``, in order, with as few copies and calls as the kernel allows."""
    buffers = list(buffers)
    while buffers:
        sent = sock.sendmsg(buffers[:_IOV_MAX])
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            buffers.pop(0)
        if sent:
            buffers[0] = memoryview(buffers[0])[sent:]


def max_fragment(max_pdu: int) -> int:
    """The largest PDV fragment for a peer's maximum PDU length (0: unlimited)."""
    return max_pdu - 6 if max_pdu > 6 else UNLIMITED_FRAGMENT


def append_pdvs(out: list, context_id: int, value: bytes | memoryview, command: bool, fragment_size: int) -> None:
    """``value`` as P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5, E.2): headers and
    slices of ``value`` (not copied) appended to ``out``."""
    total, pos = len(value), 0
    flag = 0x01 if command else 0x00
    while True:
        size = min(fragment_size, total - pos)
        last = pos + size >= total
        out.append(struct.pack(">BBIIBB", P_DATA_TF, 0, size + 6, size + 2, context_id, flag | (0x02 if last else 0)))
        out.append(value[pos:pos + size])
        pos += size
        if last:
            return


def writable_socket(assoc: Any) -> socket.socket | None:
    """The acceptor association's TCP socket, when the thread serving a request may
    write its messages (responses, C-GET sub-operations) to it directly instead of
    handing each PDU to the DUL thread: the association is established (Sta6), the DUL
    has nothing queued to send, and nobody listens to the PDU/data sent events but
    pynetdicom's quiet standard handler. Then no other writer exists: only the serving
    thread produces messages (the DUL writes only what is queued), and the peer sent
    the request only after the previous response had reached it. Not for TLS."""
    dul = assoc.dul
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if sock is None or isinstance(sock, ssl.SSLSocket) or not assoc.is_established:
        return None
    if dul.to_provider_queue.qsize() or dul.state_machine.current_state != "Sta6":
        return None
    if _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG) or assoc.get_handlers(evt.EVT_DATA_SENT):
        return None
    if any(h is not standard_pdu_sent_handler for h, _ in assoc.get_handlers(evt.EVT_PDU_SENT)):
        return None
    return sock


def write_or_close(assoc: Any, sock: socket.socket, buffers: list) -> bool:
    """Write ``buffers``; on a broken connection tell the DUL (Evt17, as pynetdicom's
    socket does) and return False."""
    try:
        send_buffers(sock, buffers)
        return True
    except OSError:
        assoc.dul.event_queue.put("Evt17")
        return False
