"""The sending side of C-MOVE and C-GET: C-STORE sub-operations with each stored
file's dataset bytes sent as they are on disk.

C-MOVE. pynetdicom's move SCP (``QueryRetrieveServiceClass._move_scp``) opens the
association to the destination with ``ae.associate(...)`` and then uses only
``is_established``, ``send_c_store(dataset, msg_id=, originator_aet=, originator_id=)``,
``release()`` and, when the association failed, ``dul.socket.close()``. :class:`NodeAE`
answers that call, when the move handler asks for it (``outbound=True`` among the
destination's keyword arguments), with a :class:`StoreRequestor`: a synchronous DICOM
upper layer requestor that lives on the move handler's thread. It negotiates with
pynetdicom's own PDU and presentation context code, then writes each C-STORE request as
P-DATA-TF PDUs straight to the socket (one ``sendmsg`` of the headers and slices of the
file's bytes) and reads the response on the same thread: no DUL or reactor threads, no
1 ms polling, no per-PDU state machine pass, no decode and re-encode.

C-GET. The sub-operations go over the SCU's own (acceptor) association:
:class:`RetrieveRequestHandler` makes those :class:`RetrieveAssociation`, whose
``send_c_store`` sends a :class:`StoredFile`'s bytes as P-DATA through node/reactor.py's
event-driven DUL, and :func:`prefer_requested_syntaxes_for_get` lets the SCU's order of
transfer syntaxes decide which one is accepted, so that what it prefers (dcmtk: explicit
VR little endian, as the archive mostly holds) is not re-encoded.

Both: the handler yields :class:`StoredFile` sub-operations, a pydicom ``Dataset``
(pynetdicom accepts nothing else) holding only the SOP Class and Instance UIDs (which
pynetdicom lists as failed when the sub-operation fails), with the file's bytes. The
dataset part is sent unchanged when the peer accepted the stored transfer syntax;
otherwise, between uncompressed syntaxes of the same byte order, it is decoded and
re-encoded by pydicom in one the peer accepted (as pynetdicom does); else the
sub-operation fails. :class:`RetrieveDIMSE` encodes the pending C-MOVE/C-GET responses
(one per sub-operation) by hand.
"""
from __future__ import annotations

import logging
import socket
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from copy import deepcopy
from io import BytesIO
from typing import Any, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_requestor
from pynetdicom.transport import AddressInformation

from storage import Archive, StoredInstance

from .commands import command_values, retrieve_rsp_command, store_rq_command
from .pdata import UNLIMITED_FRAGMENT, append_pdvs, send_buffers
from .reactor import EventDrivenAssociation, EventDrivenDIMSE, EventDrivenRequestHandler

log = logging.getLogger("dicomnode.node")
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# PDU types (PS3.8 9.3)
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
_RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # service user, no reason


# ---------------------------------------------------------------- stored files


class StoredFile(Dataset):
    """A stored instance to send as it is: its Part-10 file's bytes, the dataset part
    starting at ``offset``. As a ``Dataset`` it holds only the SOP Class and Instance
    UIDs (and file meta with the transfer syntax)."""

    def __init__(self, raw: bytes, offset: int, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.file_meta = pydicom.dataset.FileMetaDataset()
        self.file_meta.TransferSyntaxUID = transfer_syntax_uid
        self._raw = raw
        self._offset = offset

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.file_meta.TransferSyntaxUID)

    @property
    def data(self) -> memoryview:
        """The dataset's bytes, in the stored transfer syntax."""
        return memoryview(self._raw)[self._offset:]

    def decoded(self) -> Dataset:
        """The whole instance parsed by pydicom (for re-encoding)."""
        return pydicom.dcmread(BytesIO(self._raw))


def read_stored_file(archive: Archive, stored: StoredInstance) -> StoredFile:
    """The stored instance's file, split after its file meta. Raises the archive's
    ``NotFound`` when the file is gone, ``OSError`` when it cannot be read and
    ``pydicom.errors.InvalidDicomError`` when it is not a Part-10 file."""
    with archive.open_instance(stored) as fh:
        raw = fh.read()
    offset, meta = split_file_meta(raw)
    ts = meta.get(0x0010) or stored.transfer_syntax_uid
    return StoredFile(raw, offset, meta.get(0x0002) or stored.sop_class_uid,
                      meta.get(0x0003) or stored.sop_instance_uid, ts)


def read_ahead(archive: Archive, instances: list[StoredInstance]) -> Iterator[tuple[StoredInstance, Future]]:
    """Each instance with the future of its :func:`read_stored_file`, the next file
    being read on a helper thread while the caller sends the current one (the read
    overlaps the wait for the destination's response). ``future.result()`` raises what
    the read raised. At most two files are held."""
    if not instances:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieve-read")
    try:
        following = pool.submit(read_stored_file, archive, instances[0])
        for n, stored in enumerate(instances):
            current = following
            if n + 1 < len(instances):
                following = pool.submit(read_stored_file, archive, instances[n + 1])
            yield stored, current
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def split_file_meta(raw: bytes) -> tuple[int, dict[int, str]]:
    """Where the dataset of a Part-10 file starts, and its file meta UIDs (0002,eeee) as
    ``{eeee: value}``. The file meta is always explicit VR little endian."""
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise pydicom.errors.InvalidDicomError("no DICM prefix after the 128-byte preamble")
    pos, end, values = 132, len(raw), {}
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > end:
            raise pydicom.errors.InvalidDicomError("malformed file meta information")
        if vr == b"UI":
            values[element] = raw[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    if 0x0010 not in values:
        raise pydicom.errors.InvalidDicomError("the file meta has no Transfer Syntax UID")
    return pos, values


# ---------------------------------------------------------------- the AE


class NodeAE(AE):
    """pynetdicom's AE; ``associate(..., outbound=True)`` opens a :class:`StoreRequestor`
    instead of a pynetdicom association (the move handler asks for it through the
    keyword arguments of its destination).

    With worker processes (cli/workers.py), ``maximum_associations`` is what the
    node's limit leaves after the associations the other processes serve, so that
    pynetdicom's own check (A-ASSOCIATE-RJ, local limit exceeded) holds node-wide."""

    association_counts: Any = None  # node.balance.ConnectionCounts, when shared

    @property
    def maximum_associations(self) -> int:
        limit = self._maximum_associations
        if self.association_counts is not None:
            limit -= self.association_counts.others()
        return max(0, limit)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]

    def associate(self, addr: Any, port: int, contexts: Any = None, ae_title: str = "ANY-SCP",
                  *args: Any, outbound: bool = False, **kwargs: Any) -> Any:
        if not outbound:
            return super().associate(addr, port, contexts, ae_title, *args, **kwargs)
        max_pdu = kwargs.get("max_pdu", self.maximum_pdu_size)
        return StoreRequestor.open(self, addr, port, ae_title, contexts or self.requested_contexts, max_pdu)


def moves_stored_files(ae: Any) -> bool:
    """Whether this AE's move associations take :class:`StoredFile` sub-operations."""
    return isinstance(ae, NodeAE)


def gets_stored_files(assoc: Any) -> bool:
    """Whether this acceptor association's C-GET sub-operations take :class:`StoredFile`."""
    return bool(getattr(assoc, "sends_stored_files", False))


# ---------------------------------------------------------------- the association


class AssociationFailed(Exception):
    """The destination refused, aborted, went silent or broke the protocol."""


class _SocketCloser:
    """``store_assoc.dul.socket.close()``: what pynetdicom's move SCP calls when the
    association could not be established."""

    def __init__(self, owner: StoreRequestor) -> None:
        self.socket = self
        self._owner = owner

    def close(self) -> None:
        self._owner._close()


class StoreRequestor:
    """A requestor association for C-STORE sub-operations, run synchronously on the
    thread that uses it."""

    def __init__(self, ae: AE, called_ae_title: str) -> None:
        self.ae = ae
        self.called_ae_title = called_ae_title
        self.sock: socket.socket | None = None
        self.is_established = False
        self.is_aborted = False
        self.is_rejected = False
        self.is_released = False
        self.accepted_contexts: list[PresentationContext] = []
        self.max_fragment = UNLIMITED_FRAGMENT
        self.dul = _SocketCloser(self)
        self._exact: dict[tuple[str, str], int] = {}
        self._by_class: dict[str, list[PresentationContext]] = {}

    # -------------------------------------------------------- negotiation

    @classmethod
    def open(cls, ae: AE, host: str, port: int, called_ae_title: str, contexts: list,
             max_pdu: int) -> StoreRequestor:
        assoc = cls(ae, str(called_ae_title).strip())
        try:
            assoc._connect(host, port, contexts, max_pdu)
        except (OSError, AssociationFailed, ValueError) as exc:
            log.error("C-MOVE destination %s at %s:%d: no association (%s)", assoc.called_ae_title, host, port, exc)
            assoc._close()
        return assoc

    def _connect(self, host: str, port: int, contexts: list, max_pdu: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=self.ae.connection_timeout or self.ae.acse_timeout)
        self.sock.settimeout(self.ae.acse_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        requested = deepcopy(list(contexts))
        for n, cx in enumerate(requested):
            cx.context_id = 2 * n + 1
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = self.ae.ae_title
        primitive.called_ae_title = self.called_ae_title
        local = self.sock.getsockname()
        primitive.calling_presentation_address = AddressInformation(local[0], local[1])
        primitive.called_presentation_address = AddressInformation(host, port)
        primitive.presentation_context_definition_list = requested
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = self.ae.implementation_class_uid
        items: list = [length, implementation]
        if self.ae.implementation_version_name:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = self.ae.implementation_version_name
            items.append(version)
        primitive.user_information = items
        request = A_ASSOCIATE_RQ()
        request.from_primitive(primitive)
        self.sock.sendall(request.encode())

        pdu_type, body = self._read_pdu()
        if pdu_type == ASSOCIATE_RJ:
            self.is_rejected = True
            rejection = A_ASSOCIATE_RJ()
            rejection.decode(_pdu(pdu_type, body))
            answer = rejection.to_primitive()
            raise AssociationFailed(f"rejected: {answer.result_str}, {answer.source_str}, {answer.reason_str}")
        if pdu_type != ASSOCIATE_AC:
            raise AssociationFailed(f"answered the association request with PDU type 0x{pdu_type:02X}")
        accept = A_ASSOCIATE_AC()
        accept.decode(_pdu(pdu_type, body))
        answer = accept.to_primitive()
        negotiated = negotiate_as_requestor(requested, answer.presentation_context_definition_results_list, {})
        self.accepted_contexts = [cx for cx in negotiated if cx.result == 0x00]
        if not self.accepted_contexts:
            self._send_raw(_ABORT_PDU)
            self.is_aborted = True
            raise AssociationFailed("no presentation context accepted")
        peer_max = answer.maximum_length_received or 0
        self.max_fragment = peer_max - 6 if peer_max > 6 else UNLIMITED_FRAGMENT
        for cx in self.accepted_contexts:
            ts = str(cx.transfer_syntax[0])
            self._exact.setdefault((str(cx.abstract_syntax), ts), int(cx.context_id))
            self._by_class.setdefault(str(cx.abstract_syntax), []).append(cx)
        self.sock.settimeout(self.ae.dimse_timeout)
        self.is_established = True
        log.debug("association with %s at %s:%d accepted: %d presentation context(s), PDVs up to %d bytes",
                  self.called_ae_title, host, port, len(self.accepted_contexts), self.max_fragment)

    # -------------------------------------------------------- C-STORE

    def send_c_store(self, dataset: Dataset, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None, originator_id: int | None = None) -> Dataset:
        """Send one C-STORE request and return the response's command set (with its
        Status), as pynetdicom's ``Association.send_c_store`` does. Raises when the
        dataset cannot be sent (no matching presentation context, association gone)."""
        if not self.is_established:
            raise RuntimeError("the association with the move destination is not established")
        sop_class = str(dataset.SOPClassUID)
        sop_instance = str(dataset.SOPInstanceUID)
        context_id, data = self._payload(dataset, sop_class)
        command = store_rq_command(msg_id, sop_class, sop_instance, priority, originator_aet, originator_id)
        buffers: list = []
        append_pdvs(buffers, context_id, command, True, self.max_fragment)
        append_pdvs(buffers, context_id, memoryview(data), False, self.max_fragment)
        try:
            self._send_buffers(buffers)
            return self._read_response(msg_id)
        except (OSError, AssociationFailed) as exc:
            self._abort_quietly()
            raise AssociationFailed(f"C-STORE of {sop_instance} to {self.called_ae_title}: {exc}") from exc

    def _payload(self, dataset: Dataset, sop_class: str) -> tuple[int, bytes | memoryview]:
        """The presentation context to use and the dataset's bytes for it."""
        ts = UID(dataset.file_meta.TransferSyntaxUID)
        context_id = self._exact.get((sop_class, str(ts)))
        if context_id is not None:
            if isinstance(dataset, StoredFile):
                return context_id, dataset.data
            return context_id, _encode(dataset, ts)
        # as pynetdicom (Association._get_valid_context): between uncompressed syntaxes
        # of the same byte order only
        if not ts.is_compressed:
            for cx in self._by_class.get(sop_class, ()):
                target = UID(cx.transfer_syntax[0])
                if not target.is_compressed and target.is_little_endian == ts.is_little_endian:
                    source = dataset.decoded() if isinstance(dataset, StoredFile) else dataset
                    log.info("C-STORE of %s to %s: re-encoded from %s to %s (the stored syntax was not accepted)",
                             dataset.SOPInstanceUID, self.called_ae_title, ts.name, target.name)
                    return int(cx.context_id), _encode(source, target)
        raise ValueError(f"{self.called_ae_title} accepted no presentation context for {sop_class} in {ts.name}")

    def _read_response(self, msg_id: int) -> Dataset:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != P_DATA_TF:
                if pdu_type == ABORT:
                    self.is_aborted = True
                    raise AssociationFailed("the destination aborted the association")
                raise AssociationFailed(f"unexpected PDU type 0x{pdu_type:02X} while waiting for a C-STORE response")
            pos, done = 0, False
            while pos + 6 <= len(body):
                (item_length,) = struct.unpack_from(">I", body, pos)
                header = body[pos + 5]
                if header & 0x01:  # command fragment; a C-STORE-RSP has no dataset
                    command += body[pos + 6:pos + 4 + item_length]
                    done = done or bool(header & 0x02)
                pos += 4 + item_length
            if done:
                break
        fields = command_values(command)
        if fields is None:
            raise AssociationFailed("malformed command set")
        if fields.get(0x0100) != 0x8001 or fields.get(0x0120) != msg_id or 0x0900 not in fields:
            raise AssociationFailed(f"expected the C-STORE response to message {msg_id}")
        if fields[0x0900] != 0x0000:  # a warning or failure: let pydicom read it all (error comment...)
            return decode(BytesIO(bytes(command)), True, True)
        status = Dataset()
        status.Status = fields[0x0900]
        return status

    # -------------------------------------------------------- PDUs

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        (length,) = struct.unpack_from(">I", header, 2)
        return header[0], self._recv_exact(length)

    def _recv_exact(self, size: int) -> bytes:
        if self.sock is None:
            raise AssociationFailed("the connection is closed")
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise AssociationFailed("the destination closed the connection")
            got += n
        return bytes(buf)

    def _send_buffers(self, buffers: list) -> None:
        if self.sock is None:
            raise AssociationFailed("the connection is closed")
        send_buffers(self.sock, buffers)

    def _send_raw(self, data: bytes | bytearray) -> None:
        if self.sock is None:
            raise AssociationFailed("the connection is closed")
        self.sock.sendall(data)

    # -------------------------------------------------------- the end

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the A-RELEASE-RP (bounded by the ACSE timeout), close."""
        if self.is_established:
            self.is_established = False
            try:
                self.sock.settimeout(self.ae.acse_timeout)  # type: ignore[union-attr]
                self._send_raw(_RELEASE_RQ_PDU)
                while True:
                    pdu_type, _ = self._read_pdu()
                    if pdu_type == RELEASE_RP:
                        self.is_released = True
                        break
                    if pdu_type == RELEASE_RQ:  # release collision (PS3.8 7.2.2): answer it
                        self._send_raw(_RELEASE_RP_PDU)
                    elif pdu_type == ABORT:
                        self.is_aborted = True
                        break
            except (OSError, AssociationFailed) as exc:
                log.warning("releasing the association with %s: %s", self.called_ae_title, exc)
        self._close()

    def abort(self) -> None:
        self._abort_quietly()

    def _abort_quietly(self) -> None:
        if self.sock is not None and not self.is_aborted:
            try:
                self._send_raw(_ABORT_PDU)
            except OSError:
                pass
        self.is_aborted = self.is_aborted or self.is_established
        self.is_established = False
        self._close()

    def _close(self) -> None:
        self.is_established = False
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


# ---------------------------------------------------------------- encoding


def _pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU whole again (pynetdicom's PDU classes decode header and body)."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _encode(dataset: Dataset, ts: UID) -> bytes:
    data = encode(dataset, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise ValueError(f"cannot encode {dataset.get('SOPInstanceUID', 'the dataset')} in {ts.name}")
    return data


# ---------------------------------------------------------------- the responses to the retrieve SCU


_RSP_COMMAND_FIELD = {C_MOVE: 0x8021, C_GET: 0x8010}


class RetrieveDIMSE(EventDrivenDIMSE):
    """node/reactor.py's DIMSE provider, also encoding the pending C-MOVE and C-GET
    responses (one per sub-operation) by hand: pynetdicom builds and encodes their
    command set twice per message (a third of a sub-operation's own cost), and writing
    them to the socket directly when :func:`writable_socket` allows it (no wake-up of
    the DUL thread per sub-operation). Only while nothing but the quiet standard log
    handler listens to ``EVT_DIMSE_SENT``."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command_field = _RSP_COMMAND_FIELD.get(type(primitive))
        if (
            command_field is not None
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0xFF00
            and primitive.Identifier is None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and self._only_quiet_listeners()
        ):
            command = retrieve_rsp_command(
                command_field, primitive.MessageIDBeingRespondedTo, primitive.Status, primitive.AffectedSOPClassUID,
                primitive.NumberOfRemainingSuboperations, primitive.NumberOfCompletedSuboperations,
                primitive.NumberOfFailedSuboperations, primitive.NumberOfWarningSuboperations,
            )
            self.send_pdvs(context_id, ((command, 0x01),))
            return
        super().send_msg(primitive, context_id)


class RetrieveAssociation(EventDrivenAssociation):
    """node/reactor.py's acceptor association whose ``send_c_store`` (the C-GET SCP's
    sub-operations) also takes a :class:`StoredFile`: when the peer accepted the stored
    transfer syntax its dataset bytes go out as they are, written to the socket by this
    thread when :func:`writable_socket` allows it, else as P-DATA primitives through
    the DUL; otherwise it is decoded and handed to pynetdicom's ``send_c_store`` (which
    converts between uncompressed syntaxes)."""

    sends_stored_files = True
    dimse_class = RetrieveDIMSE

    def send_c_store(self, dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return super().send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        if not self.is_established:
            raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")
        sop_class, sop_instance = str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)
        context_id = self._stored_syntax_context(sop_class, str(dataset.transfer_syntax))
        if context_id is None:
            log.info("C-STORE of %s to %s: the stored syntax %s was not accepted; decoding it",
                     sop_instance, self.requestor.ae_title, dataset.transfer_syntax.name)
            return super().send_c_store(dataset.decoded(), msg_id, priority, originator_aet, originator_id)
        command = store_rq_command(msg_id, sop_class, sop_instance, priority, originator_aet, originator_id)
        # as pynetdicom's send_c_store: the association reactor must not take the response
        self._reactor_checkpoint.clear()
        while not self._is_paused:
            time.sleep(0.0001)
        try:
            if not self.dimse.send_pdvs(context_id, ((command, 0x01), (dataset.data, 0x00))):
                raise AssociationFailed(f"the connection to {self.requestor.ae_title} broke")
            _, rsp = self.dimse.get_msg(block=True)
        finally:
            self._reactor_checkpoint.set()
        if rsp is None:
            self._handle_no_response()
            return Dataset()
        return self._check_received_status(rsp)

    def _stored_syntax_context(self, sop_class: str, ts: str) -> int | None:
        """The accepted context (SCU role) for ``sop_class`` in exactly ``ts``."""
        for cx in self.accepted_contexts:
            if cx.as_scu and cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts:
                return int(cx.context_id)
        return None


def prefer_requested_syntaxes_for_get(assoc: Any) -> None:
    """Before an acceptor association is negotiated: for the storage SOP classes whose
    SCP role the requestor proposes (it will take C-GET sub-operations), accept the
    first of its proposed transfer syntaxes that we support, rather than the first of
    ours (pynetdicom's rule, which puts implicit VR little endian first): the stored
    bytes can go out in any syntax unchanged, and the requestor, dcmtk's getscu for
    one, lists the syntax it prefers first. Other SOP classes keep the AE's order."""
    try:
        wanted = {str(uid) for uid, item in assoc.requestor.role_selection.items() if item.scp_role}
        proposed = assoc.requestor.primitive.presentation_context_definition_list
    except (AttributeError, TypeError):
        return
    if not wanted:
        return
    order: dict[str, list[str]] = {}  # every syntax proposed for a class, first seen first
    for cx in proposed:
        syntaxes = order.setdefault(str(cx.abstract_syntax), [])
        syntaxes += [str(ts) for ts in cx.transfer_syntax if str(ts) not in syntaxes]
    contexts = []
    for cx in assoc.acceptor.supported_contexts:
        abstract = str(cx.abstract_syntax)
        if abstract in wanted and abstract in order:
            ours = {str(ts) for ts in cx.transfer_syntax}
            # only those it proposed matter to the negotiation with it: in its order
            theirs = [ts for ts in order[abstract] if ts in ours]
            if theirs:
                preferred = build_context(cx.abstract_syntax, theirs)
                preferred.scu_role, preferred.scp_role = cx.scu_role, cx.scp_role
                cx = preferred
        contexts.append(cx)
    assoc.acceptor.supported_contexts = contexts


class RetrieveRequestHandler(EventDrivenRequestHandler):
    """node/reactor.py's request handler, whose acceptor associations are
    :class:`RetrieveAssociation` with :class:`RetrieveDIMSE` as DIMSE provider."""

    association_class = RetrieveAssociation
