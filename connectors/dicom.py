"""DICOM storage SCP (C-STORE, C-ECHO) hosted on the engine's event loop: bytes in, a `StoreRequest` out.

One asyncio server per listening AE title; each association runs the upper layer of
connectors/dicom_association.py. The handler given here decides the status (engine/dicom_intake).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import structlog

from connectors.dicom_association import (
    OUT_OF_RESOURCES,
    AssociationRules,
    Refusal,
    RefusalHandler,
    StoreHandler,
    StoreRequest,
    serve_association,
)
from connectors.peers import PeerAllowList
from connectors.spool import SpoolFiles

__all__ = ["OUT_OF_RESOURCES", "DicomServer", "Refusal", "StoreHandler", "StoreRequest", "no_delay"]

log = structlog.get_logger("relais.dicom")

HANDSHAKE_TIMEOUT = 10.0  # seconds for a TLS client to finish its handshake


def no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY: without it a C-STORE response waits for the peer's delayed ACK (~11/s)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class DicomServer:
    """One listening AE title; `start`/`stop` from the event loop."""

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        ae_title: str,
        handler: StoreHandler,
        spool: Path,
        allowed_calling_aets: list[str] | None = None,
        allowed_peers: list[str] | None = None,
        max_pdu: int = 1024 * 1024,
        max_associations: int = 32,
        network_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        on_refusal: RefusalHandler | None = None,
        reuse_port: bool = False,  # several processes listen on the port (acceptors)
    ) -> None:
        self.name = name
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.rules = AssociationRules(
            ae_title=ae_title,
            handler=handler,
            spool=SpoolFiles(spool),
            allowed_calling_aets=frozenset(a.strip() for a in allowed_calling_aets or []),
            max_pdu=max_pdu,
            network_timeout=network_timeout,
            on_refusal=on_refusal,
        )
        self.peers = PeerAllowList(allowed_peers or [])
        self.max_associations = max_associations
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._associations = 0

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _may_open(self) -> bool:
        return self._associations <= self.max_associations

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._associations += 1
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            if not self.peers.allows(peer[0]):
                log.warning("dicom_peer_refused", listener=self.name, peer=peer[0])
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                no_delay(sock)
            await serve_association(reader, writer, self.rules, str(peer[0]), self._may_open)
        finally:
            self._associations -= 1
            self._connections.discard(task)
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection,
            self.host,
            self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.ssl_context else None,
            limit=self.rules.max_pdu + 64 * 1024,
            reuse_port=self.reuse_port or None,
        )
        log.info("dicom_listening", listener=self.name, port=self.bound_port, ae_title=self.rules.ae_title)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):  # open associations are cut; partial datasets dropped
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=10)
        await server.wait_closed()
        self.rules.spool.close()
