"""DICOM storage SCP (C-STORE, C-ECHO) on pynetdicom: bytes in, a `StoreRequest` out.

pynetdicom runs each association on its own thread and spools each dataset to a file
(never whole in memory); the handler given here decides the status (see engine/dicom_intake).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dul
import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["OUT_OF_RESOURCES", "DicomServer", "StoreRequest", "no_delay"]

log = structlog.get_logger("relais.dicom")

OUT_OF_RESOURCES = 0xA700
# Datasets are written to a temporary file as they arrive, never held whole in memory.
# (A process-wide pynetdicom setting: every SCP in this process receives into files.)
_config.STORE_RECV_CHUNKED_DATASET = True
# pynetdicom's own PDU/DIMSE log handlers run on every PDU even when nothing is logged;
# Relais logs associations and instances itself.
_config.LOG_HANDLER_LEVEL = "none"


# pynetdicom's association and DUL threads poll their queues with `time.sleep(0.001)`:
# with one association, that is ~1 ms of latency per C-STORE, ~30 % of a small instance's
# time (bare receiver: ~300 -> ~400 instances/s here). While PDUs keep arriving (within
# BUSY_WINDOW) and at most FAST_POLL_ASSOCIATIONS associations are open, those 1 ms sleeps
# become POLL_SLEEP. With more associations the polling threads' CPU (and GIL) costs more
# than their latency (4 associations: 5.5 against 3.7 ms of CPU per instance, no faster);
# when all is quiet idle associations cost what they cost before.
POLL_SLEEP = 0.0001
BUSY_WINDOW = 0.5
FAST_POLL_ASSOCIATIONS = 2
_last_pdu = [0.0]  # monotonic time of the last PDU received by any association
_open = [0]  # associations open on this process's listeners


class _PollingClock:
    """pynetdicom's view of the `time` module, with the short polling sleep."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0.001 and _open[0] <= FAST_POLL_ASSOCIATIONS and time.monotonic() - _last_pdu[0] < BUSY_WINDOW:
            seconds = POLL_SLEEP
        time.sleep(seconds)


def _pdu_received(event: evt.Event) -> None:
    _last_pdu[0] = time.monotonic()


_open_lock = threading.Lock()


def _connection_opened(event: evt.Event) -> None:
    with _open_lock:
        _open[0] += 1


pynetdicom.association.time = _PollingClock()  # type: ignore[assignment]
pynetdicom.dul.time = _PollingClock()  # type: ignore[assignment]


def no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY: without it a C-STORE response waits for the peer's delayed ACK (~11/s)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One received C-STORE: the spooled DICOM file (file meta + dataset as sent) and who sent it."""

    path: Path
    calling_ae: str
    called_ae: str
    peer: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


StoreHandler = Callable[[StoreRequest], int]
HANDSHAKE_TIMEOUT = 10.0  # seconds for a TLS client to finish its handshake


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every accepted socket and a peer allow-list."""

    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # pynetdicom does the TLS handshake here, on the accepting thread: one silent client
        # would hold every other one. It is done in the connection's own thread instead.
        assert self.socket is not None
        client, address = self.socket.accept()
        no_delay(client)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context:
            request.settimeout(HANDSHAKE_TIMEOUT)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
            request.settimeout(None)
        super().finish_request(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        if any(ip in net for net in self.allowed_networks):
            return True
        log.warning("dicom_peer_refused", peer=client_address[0])
        return False


def _connection_closed(event: evt.Event) -> None:
    """Count it; if it closed mid-dataset, drop the temporary file pynetdicom would leave behind."""
    with _open_lock:
        _open[0] -= 1
    message = getattr(event.assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)


class DicomServer:
    """One listening AE title; `start`/`stop` from the event loop, the work on pynetdicom's threads."""

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        ae_title: str,
        handler: StoreHandler,
        allowed_calling_aets: list[str] | None = None,
        allowed_peers: list[str] | None = None,
        max_pdu: int = 1024 * 1024,
        max_associations: int = 32,
        network_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ae_title = ae_title
        self.handler = handler
        self.allowed_calling_aets = list(allowed_calling_aets or [])
        self.allowed_networks = [ipaddress.ip_network(c, strict=False) for c in allowed_peers or []]
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.ssl_context = ssl_context
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.maximum_associations = self.max_associations
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = self.network_timeout
        ae.dimse_timeout = self.network_timeout
        ae.require_called_aet = True
        if self.allowed_calling_aets:
            ae.require_calling_aet = self.allowed_calling_aets
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        request = cast(C_STORE, event.request)
        req = StoreRequest(
            path=event.dataset_path,
            calling_ae=str(assoc.requestor.ae_title).strip(),
            called_ae=str(assoc.acceptor.ae_title).strip(),
            peer=str(assoc.requestor.address),
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            transfer_syntax=str(event.context.transfer_syntax),
        )
        try:
            return self.handler(req)
        except Exception as e:  # never let a bug answer success
            log.error("dicom_store_failed", listener=self.name, error=type(e).__name__, detail=str(e)[:200])
            return OUT_OF_RESOURCES

    async def start(self) -> None:
        ae = self._application_entity()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, _connection_closed),
            (evt.EVT_PDU_RECV, _pdu_received),
            (evt.EVT_CONN_OPEN, _connection_opened),
        ]
        server = await asyncio.to_thread(
            functools.partial(
                ae.make_server,
                (self.host, self.port),
                ssl_context=self.ssl_context,
                evt_handlers=handlers,  # type: ignore[arg-type]
                server_class=_Server,
            )
        )
        assert isinstance(server, _Server)
        server.allowed_networks = self.allowed_networks
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"dicom-{self.name}", daemon=True
        )
        self._thread.start()
        log.info("dicom_listening", listener=self.name, port=self.bound_port, ae_title=self.ae_title)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # BaseServer.shutdown waits for serve_forever to return (pynetdicom's own shutdown
        # expects a server made by start_server); then open associations are aborted.
        await asyncio.to_thread(socketserver.BaseServer.shutdown, server)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        for assoc in server.active_associations:
            assoc.abort()
        await asyncio.to_thread(server.server_close)
