"""The DIMSE side: a pynetdicom AE bound to the archive."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from config import Settings
from storage import Archive

from . import handlers as h
from . import worklist as wl
from .datasets import install_identifier_encoder
from .balance import ConnectionCounts, left_to_another
from .outbound import NodeAE, RetrieveRequestHandler

log = logging.getLogger("dicomnode.node")

QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


class DicomNode:
    """Owns the AE and its listening server; ``start`` returns once it accepts."""

    def __init__(self, settings: Settings, archive: Archive,
                 association_counts: ConnectionCounts | None = None) -> None:
        self.settings = settings
        self.archive = archive
        # the associations each process of the node serves (cli/workers.py), or None;
        # this process's count is its server's
        self.association_counts = association_counts
        if association_counts is not None:
            association_counts.active = lambda: len(self.active_associations())
        self.context = h.NodeContext(settings, archive, association_counts=association_counts)
        self.ae = build_ae(settings)
        self.ae.association_counts = association_counts
        # C-STORE datasets are received straight into the archive's temp folder
        # (node/store_receipt.py); an archive without one gets pynetdicom's temp files
        self.ae.dicomnode_receive_folder = archive.receive_folder()
        self.ae.dicomnode_name_sync = archive.start_name_sync
        self.ae.dicomnode_foreground = archive.foreground
        self.server: ThreadedAssociationServer | None = None
        archive.workitems.ae_title = settings.ae.title  # where a workitem's images are retrieved
        self.event_reporter = wl.EventReporter(settings, archive.events)
        archive.metrics.gauge("dicomnode_associations_active", self.associations_open)

    @property
    def port(self) -> int:
        if self.server is None:
            return self.settings.ae.port
        return self.server.server_address[1]

    def handlers(self) -> list[tuple[Any, ...]]:
        c = [self.context]
        return [
            (evt.EVT_CONN_OPEN, h.handle_conn_open, c),
            (evt.EVT_CONN_CLOSE, h.handle_conn_close, c),
            (evt.EVT_REQUESTED, h.handle_requested, c),
            (evt.EVT_ESTABLISHED, h.handle_established, c),
            (evt.EVT_RELEASED, h.handle_closed, c),
            (evt.EVT_ABORTED, h.handle_closed, c),
            (evt.EVT_C_ECHO, h.handle_echo, c),
            (evt.EVT_C_STORE, h.handle_store, c),
            (evt.EVT_C_FIND, wl.handle_find, c),  # worklist, UPS, else query/retrieve
            (evt.EVT_C_MOVE, h.handle_move, c),
            (evt.EVT_C_GET, h.handle_get, c),
            (evt.EVT_N_CREATE, wl.handle_n_create, c),
            (evt.EVT_N_GET, wl.handle_n_get, c),
            (evt.EVT_N_SET, wl.handle_n_set, c),
            (evt.EVT_N_ACTION, wl.handle_n_action, c),
        ]

    def start(self, listening_socket: socket.socket | None = None, report_events: bool = True) -> None:
        """Listen on ``[ae] host:port``, or accept on ``listening_socket``, a socket
        another process of the node listens on (cli/workers.py). ``report_events``:
        send UPS N-EVENT-REPORTs from this process (the serving process does)."""
        ae = self.settings.ae
        # pynetdicom's AE.start_server(block=False), with the event-driven acceptor
        # associations of node/reactor.py, extended for C-MOVE/C-GET responses and
        # C-GET sub-operations by node/outbound.py (pynetdicom's own request_handler
        # argument).
        server_class = type("NodeServer", (SharedAcceptServer,),
                            {"adopted_socket": listening_socket, "counts": self.association_counts})
        server = self.ae.make_server(
            (ae.host, ae.port), ae_title=ae.title, evt_handlers=self.handlers(),
            server_class=server_class, request_handler=RetrieveRequestHandler,
        )
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # as start_server does; server.shutdown() removes it
        self.server = server
        if report_events:
            self.event_reporter.start()
        if listening_socket is None:
            log.info("DIMSE node %s listening on %s:%d", ae.title, ae.host, self.port)

    def associations_open(self) -> int:
        """Associations open now, in every process of the node."""
        here = len(self.active_associations())
        return here + (self.association_counts.others() if self.association_counts is not None else 0)

    def active_associations(self) -> list:
        return self.server.active_associations if self.server else []

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let associations in flight finish (up to ``grace_s``), then
        abort what is left."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        self.event_reporter.stop()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            # Wait for associations doing work; a connection that never completed its
            # association request (a port scan, a stuck peer) is not worth waiting for.
            if not any(assoc.is_established for assoc in server.active_associations):
                break
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_established:
                log.warning("aborting association with %s still open at shutdown", assoc.requestor.ae_title)
                assoc.abort()
            elif assoc.dul.socket is not None:
                # never associated: an A-ABORT is not valid before the request (pynetdicom
                # raises InvalidEventError); closing the connection ends it cleanly
                assoc.dul.socket.close()
        log.info("DIMSE node stopped")


class SharedAcceptServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, whose listening socket other processes may accept
    on too: accepting never blocks (a connection another process took first is simply
    not ours), a process serving more associations than another lets that one accept
    first (``counts``), and with ``adopted_socket`` the server takes that socket instead
    of binding its own."""

    adopted_socket: socket.socket | None = None
    counts: ConnectionCounts | None = None  # the node's associations per process, when shared

    def _handle_request_noblock(self) -> None:
        """Accept one connection, after a short wait when another process of the node
        serves fewer associations (node/balance.py)."""
        if self.counts is not None and left_to_another(self.socket, self.counts):
            return
        super()._handle_request_noblock()

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        if self.counts is not None:
            self.counts.accepted()
        return request

    def server_bind(self) -> None:
        if self.adopted_socket is None:
            super().server_bind()
        else:
            self.socket.close()  # the one socketserver made, never bound
            self.socket = self.adopted_socket
            self.server_address = self.socket.getsockname()
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self.adopted_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.adopted_socket is None:
            super().server_close()
        else:  # a shutdown() would end the listening socket in every process
            self.socket.close()


def build_ae(settings: Settings) -> NodeAE:
    # Received C-STORE datasets go straight to a file as their PDUs arrive, which the
    # archive takes over (no bytes object of the whole dataset, no copy). pynetdicom's
    # documented switch; it is process-wide, and the store handler accepts both ways.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom formats every C-FIND response identifier (pretty_dataset) to log it at
    # DEBUG, whatever the log level: about a third of its per-response cost. Only
    # when its debug log is on.
    _config.LOG_RESPONSE_IDENTIFIERS = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
    install_identifier_encoder()
    ae = NodeAE(ae_title=settings.ae.title)  # C-MOVE sub-operations: node/outbound.py
    ae.maximum_associations = settings.ae.max_associations
    ae.maximum_pdu_size = settings.ae.max_pdu_size
    ae.acse_timeout = settings.ae.acse_timeout_s
    ae.dimse_timeout = settings.ae.dimse_timeout_s
    ae.network_timeout = settings.ae.network_timeout_s
    # called-AE-title checks are done (and logged) by handle_requested
    ae.require_called_aet = False
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        # scp_role/scu_role: accept the SCP role for C-GET sub-operations
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in (*QUERY_RETRIEVE, *wl.WORKLIST_SOP_CLASSES):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae
