"""pynetdicom event handlers: small functions that translate DIMSE to archive calls and
archive results to DIMSE statuses. They receive their dependencies through the 3-tuple
binding ``(evt.EVT_X, handler, [context])``; decisions stay in the archive."""
from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from config import Settings
from storage import Archive, ArchiveError, Query, Source
from storage.errors import StorageFailure
from storage.identity import AuditEntry
from storage.attributes import UNIQUE_KEY

from .datasets import ResponseBuilder, identifier_keys
from .outbound import gets_stored_files, moves_stored_files, prefer_requested_syntaxes_for_get, read_ahead
from .statuses import FIND_STATUS, RETRIEVE_STATUS, STORE_STATUS, status_for

log = logging.getLogger("dicomnode.node")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
UNCOMPRESSED = (
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
)
MAX_CONTEXTS = 128


@dataclass
class AssociationLog:
    """What one peer did during one association, logged when it ends."""

    calling_ae: str
    address: str
    organization: str
    operations: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)


@dataclass
class NodeContext:
    """Everything the handlers need, bound once when the AE is built."""

    settings: Settings
    archive: Archive
    associations: dict[int, AssociationLog] = field(default_factory=dict)
    association_counts: Any = None  # node.balance.ConnectionCounts, with worker processes

    def peer_of(self, event: Event) -> AssociationLog:
        assoc = event.assoc
        entry = self.associations.get(id(assoc))
        if entry is None:
            calling = assoc.requestor.ae_title.strip()
            peer = self.settings.peer(calling)
            entry = AssociationLog(
                calling_ae=calling,
                address=f"{assoc.requestor.address}:{assoc.requestor.port}",
                organization=peer.organization if peer else "local",
            )
            self.associations[id(assoc)] = entry
        return entry

    def source(self, event: Event) -> Source:
        peer = self.peer_of(event)
        return Source("dimse", peer.calling_ae, peer.address.rsplit(":", 1)[0], peer.organization)


# ---------------------------------------------------------------- connection events


def handle_conn_open(event: Event, ctx: NodeContext) -> None:
    """Turn Nagle's algorithm off: every multi-response DIMSE operation would otherwise
    wait ~40 ms per PDU for the peer's delayed ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    if ctx.association_counts is not None:  # what the other processes see of this one
        # pynetdicom signals the connection before it starts the association's thread,
        # and the server counts its associations by their running threads
        ctx.association_counts.update(opening=0 if event.assoc.is_alive() else 1)


def handle_conn_close(event: Event, ctx: NodeContext) -> None:
    if ctx.association_counts is not None:
        ctx.association_counts.update(closing=1 if event.assoc.is_alive() else 0)


def handle_requested(event: Event, ctx: NodeContext) -> None:
    """Access control at association time: unknown peers (when required) are rejected
    with A-ASSOCIATE-RJ, calling-AE-not-recognized."""
    assoc = event.assoc
    request = assoc.requestor.primitive  # the A-ASSOCIATE-RQ; requestor.ae_title is set later
    calling = _text(request.calling_ae_title)
    called = _text(request.called_ae_title)
    host = assoc.requestor.address
    if ctx.settings.ae.require_known_peers:
        peer = ctx.settings.peer(calling)
        if peer is None or not _same_host(peer.host, host):
            why = "unknown calling AE title" if peer is None else f"host {host} is not {peer.host}"
            log.warning("rejected association from %s@%s: %s (add it to [[peers]] in ae.toml)", calling, host, why)
            _audit(ctx, calling, host, peer.organization if peer else None, "rejected", why)
            ctx.archive.metrics.inc("dicomnode_associations_total", outcome="rejected")
            _reject(assoc, 0x03)
            return
    if ctx.settings.ae.require_called_ae_title and called != ctx.settings.ae.title:
        log.warning(
            "rejected association from %s@%s: called AE title %r is not ours (%r)",
            calling, host, called, ctx.settings.ae.title,
        )
        _audit(ctx, calling, host, None, "rejected", f"called AE title {called!r} is not ours")
        ctx.archive.metrics.inc("dicomnode_associations_total", outcome="rejected")
        _reject(assoc, 0x07)
        return
    prefer_requested_syntaxes_for_get(assoc)


def _reject(assoc, diagnostic: int) -> None:
    """A-ASSOCIATE-RJ (permanent, service user, ``diagnostic``), then wait for the DUL
    to send it before the connection closes, as pynetdicom's own rejections do."""
    assoc.acse.send_reject(0x01, 0x01, diagnostic)
    assoc.kill()


def _text(value: str | bytes) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).strip()


def _same_host(configured: str, actual: str) -> bool:
    if configured == actual:
        return True
    try:
        return actual in {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except OSError:
        return False


def handle_established(event: Event, ctx: NodeContext) -> None:
    peer = ctx.peer_of(event)
    ctx.archive.metrics.inc("dicomnode_associations_total", outcome="accepted")
    log.info("association from %s@%s accepted", peer.calling_ae, peer.address)


def handle_closed(event: Event, ctx: NodeContext) -> None:
    """Released or aborted: log what the peer did."""
    peer = ctx.associations.pop(id(event.assoc), None)
    if peer is None:
        return
    how = "aborted" if event.event is evt.EVT_ABORTED else "released"
    ops = ", ".join(f"{name} x{count}" for name, count in sorted(peer.operations.items())) or "nothing"
    fails = ", ".join(f"{name} x{count}" for name, count in sorted(peer.failures.items()))
    log.info(
        "association from %s@%s %s: %s%s", peer.calling_ae, peer.address, how, ops,
        f"; failures: {fails}" if fails else "",
    )
    _audit(ctx, peer.calling_ae, peer.address, peer.organization, how, ops + (f"; failures: {fails}" if fails else ""))


def _audit(ctx: NodeContext, calling_ae: str, address: str, organization: str | None, outcome: str,
           detail: str) -> None:
    """Append one association to the audit log (calling AE, address, what it did)."""
    entry = AuditEntry(time.time(), "dimse", calling_ae, "peer", organization, "association", None, outcome,
                       address, detail)
    try:
        ctx.archive.identity.append_audit(entry)
    except ArchiveError as exc:
        log.error("could not audit the association from %s@%s: %s", calling_ae, address, exc.message)


# ---------------------------------------------------------------- services


def handle_echo(event: Event, ctx: NodeContext) -> int:
    ctx.peer_of(event).operations["C-ECHO"] += 1
    return 0x0000


def handle_store(event: Event, ctx: NodeContext) -> int:
    peer = ctx.peer_of(event)
    peer.operations["C-STORE"] += 1
    try:
        # The file meta pynetdicom prepends carries the command's SOP Class and Instance
        # UIDs; the archive refuses a dataset that disagrees with them.
        received = getattr(event.request, "_dataset_path", None)  # = event.dataset_path when set
        failure = getattr(event.request, "_dicomnode_receive_error", None)
        if failure is not None:
            # the dataset could not be written as it arrived (node/store_receipt.py)
            raise StorageFailure(f"could not receive the dataset: {failure.strerror or failure}")
        if isinstance(received, Path):
            # STORE_RECV_CHUNKED_DATASET (node/server.py): pynetdicom wrote the dataset
            # to a file as it arrived; the archive takes that file over.
            try:
                ctx.archive.store_received_file(
                    received, ctx.source(event),
                    name_synced=getattr(event.request._dataset_file, "name_synced", None),
                )
            finally:
                # The archive took the file over (placed, or removed): nothing
                # is left for pynetdicom to unlink after this handler.
                dataset_file, event.request._dataset_file = event.request._dataset_file, None
                if dataset_file is not None:
                    dataset_file.close()
        else:
            ctx.archive.store_bytes(event.encoded_dataset(include_meta=True), ctx.source(event))
    except ArchiveError as exc:
        status = status_for(exc, STORE_STATUS)
        peer.failures[f"C-STORE 0x{status:04X}"] += 1
        ctx.archive.metrics.inc("dicomnode_dimse_requests_total", service="C-STORE", status=f"0x{status:04X}")
        log.warning("C-STORE from %s@%s refused (0x%04X): %s", peer.calling_ae, peer.address, status, exc.message)
        return status
    ctx.archive.metrics.inc("dicomnode_dimse_requests_total", service="C-STORE", status="0x0000")
    return 0x0000


def handle_find(event: Event, ctx: NodeContext) -> Iterator[tuple[int, Dataset | None]]:
    peer = ctx.peer_of(event)
    peer.operations["C-FIND"] += 1
    root = "PATIENT" if event.request.AffectedSOPClassUID == PATIENT_ROOT_FIND else "STUDY"
    try:
        identifier = event.identifier
        level, keys = identifier_keys(identifier)
        query = Query(level, keys, root=root, organizations=(peer.organization,))
        cancelled = CancelLatch(event)
        matches = ctx.archive.find(query, is_cancelled=cancelled)
        responses = ResponseBuilder(level, identifier, ctx.settings.ae.title)
        count = 0
        for values in matches:
            yield 0xFF00, responses.build(values)
            count += 1
        if cancelled():
            log.info("C-FIND from %s@%s cancelled after %d match(es)", peer.calling_ae, peer.address, count)
            yield 0xFE00, None
            return
        log.info("C-FIND %s level from %s@%s: %d match(es)", level, peer.calling_ae, peer.address, count)
    except ArchiveError as exc:
        status = status_for(exc, FIND_STATUS)
        peer.failures[f"C-FIND 0x{status:04X}"] += 1
        log.warning("C-FIND from %s@%s failed (0x%04X): %s", peer.calling_ae, peer.address, status, exc.message)
        yield status, None
        return
    yield 0x0000, None


@dataclass(frozen=True)
class UnreadableInstance:
    """Stands in for a dataset that could not be read from the archive."""

    sop_instance_uid: str


class CancelLatch:
    """``event.is_cancelled`` is true only once (pynetdicom consumes the C-CANCEL when
    it reports it); this remembers it for the rest of the operation."""

    def __init__(self, event: Event) -> None:
        self.event = event
        self.cancelled = False

    def __call__(self) -> bool:
        if not self.cancelled and self.event.is_cancelled:
            self.cancelled = True
        return self.cancelled


def _retrieve_set(event: Event, ctx: NodeContext, root_uid: str) -> list:
    identifier = event.identifier
    level, keys = identifier_keys(identifier)
    root = "PATIENT" if event.request.AffectedSOPClassUID == root_uid else "STUDY"
    return ctx.archive.retrieve(level, keys, root=root, organizations=(ctx.peer_of(event).organization,))


def handle_move(event: Event, ctx: NodeContext) -> Iterator[Any]:
    peer = ctx.peer_of(event)
    peer.operations["C-MOVE"] += 1
    destination = event.move_destination
    destination = (destination.decode() if isinstance(destination, bytes) else str(destination)).strip()
    target = ctx.settings.peer(destination)
    if target is None:
        log.warning(
            "C-MOVE from %s@%s to unknown destination %r refused (0xA801): add it to [[peers]] in ae.toml",
            peer.calling_ae, peer.address, destination,
        )
        peer.failures["C-MOVE 0xA801"] += 1
        yield None, None
        return
    try:
        instances = _retrieve_set(event, ctx, PATIENT_ROOT_MOVE)
    except ArchiveError as exc:
        status = status_for(exc, RETRIEVE_STATUS)
        peer.failures[f"C-MOVE 0x{status:04X}"] += 1
        log.warning("C-MOVE from %s@%s refused (0x%04X): %s", peer.calling_ae, peer.address, status, exc.message)
        # pynetdicom reports a status only after a destination and a non-zero count
        yield target.host, target.port, {"contexts": [build_context(Verification)]}
        yield 1
        yield status, None
        return
    contexts = storage_contexts(instances)
    as_stored = moves_stored_files(event.assoc.ae)
    if as_stored:
        # node/outbound.py: the stored files' dataset bytes, over a synchronous association
        options: dict[str, Any] = {"contexts": contexts, "outbound": True}
    else:
        options = {"contexts": contexts, "evt_handlers": [(evt.EVT_CONN_OPEN, handle_conn_open)]}
    yield target.host, target.port, options
    log.info(
        "C-MOVE from %s@%s: %d instance(s) to %s (%s:%d)", peer.calling_ae, peer.address,
        len(instances), destination, target.host, target.port,
    )
    yield len(instances)
    yield from _send_each(event, ctx, instances, as_stored=as_stored)


def handle_get(event: Event, ctx: NodeContext) -> Iterator[Any]:
    peer = ctx.peer_of(event)
    peer.operations["C-GET"] += 1
    try:
        instances = _retrieve_set(event, ctx, PATIENT_ROOT_GET)
    except ArchiveError as exc:
        status = status_for(exc, RETRIEVE_STATUS)
        peer.failures[f"C-GET 0x{status:04X}"] += 1
        log.warning("C-GET from %s@%s refused (0x%04X): %s", peer.calling_ae, peer.address, status, exc.message)
        yield 1  # pynetdicom reports a status only after a non-zero count
        yield status, None
        return
    log.info("C-GET from %s@%s: %d instance(s)", peer.calling_ae, peer.address, len(instances))
    yield len(instances)
    yield from _send_each(event, ctx, instances, as_stored=gets_stored_files(event.assoc))


def _send_each(event: Event, ctx: NodeContext, instances: list, as_stored: bool = False,
               ) -> Iterator[tuple[int, Dataset | None]]:
    """The sub-operations: each instance as a :class:`~node.outbound.StoredFile` (its
    file's bytes, sent as they are; the next file read meanwhile) when ``as_stored``,
    else as a pydicom dataset."""
    cancelled = CancelLatch(event)
    reads = read_ahead(ctx.archive, instances) if as_stored else ((stored, None) for stored in instances)
    for stored, pending in reads:
        if cancelled():
            yield 0xFE00, None
            return
        try:
            ds = pending.result() if pending is not None else ctx.archive.read_dataset(stored)
        except (ArchiveError, OSError, pydicom.errors.InvalidDicomError) as exc:
            log.error("cannot read stored instance %s: %s", stored.sop_instance_uid, exc)
            # pynetdicom counts a pending yield that is not a Dataset as a failed
            # sub-operation, so the final status becomes 0xB000 (warning)
            yield 0xFF00, UnreadableInstance(stored.sop_instance_uid)  # type: ignore[misc]
            continue
        yield 0xFF00, ds


def storage_contexts(instances: list) -> list:
    """Presentation contexts to offer a move destination: each SOP class in each of its
    stored transfer syntaxes alone (the destination accepts that one if it can, and the
    stored bytes go out as they are), then, for SOP classes stored uncompressed, one
    with the uncompressed syntaxes pydicom can re-encode to."""
    stored: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = stored.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax_uid not in syntaxes:
            syntaxes.append(instance.transfer_syntax_uid)
    contexts = [build_context(sop_class, [ts]) for sop_class, syntaxes in stored.items() for ts in syntaxes]
    contexts += [
        build_context(sop_class, list(UNCOMPRESSED))
        for sop_class, syntaxes in stored.items()
        if any(not pydicom.uid.UID(ts).is_compressed for ts in syntaxes)
    ]
    if len(contexts) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; offering the first %d", len(contexts), MAX_CONTEXTS)
        contexts = contexts[:MAX_CONTEXTS]
    return contexts


__all__ = [
    "NodeContext", "UNIQUE_KEY", "handle_conn_open", "handle_requested", "handle_established",
    "handle_closed", "handle_echo", "handle_store", "handle_find", "handle_move", "handle_get",
]
