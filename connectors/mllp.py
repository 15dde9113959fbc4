"""MLLP (HL7 v2 Minimal Lower Layer Protocol) listener: framing, TLS, limits. Bytes only.

A frame is `0x0B <message> 0x1C 0x0D`. Junk before the start byte is dropped, a missing
final CR is accepted, several frames in one read and one frame over many reads both work;
one message is in flight per connection, which keeps each sender's order. What a frame
means is the handler's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from connectors.peers import PeerAllowList

__all__ = ["END_BLOCK", "START_BLOCK", "FrameAnswer", "FrameHandler", "MllpServer", "frame"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CR = b"\r"
READ_SIZE = 256 * 1024

log = structlog.get_logger("relais.mllp")


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK + CR


@dataclass(frozen=True)
class FrameAnswer:
    """An answer now, and one more later on the same connection (e.g. an HL7 application
    ACK after the commit ACK); the next frame is read without waiting for `later`."""

    now: bytes | None
    later: Awaitable[bytes | None] | None = None


class FrameHandler(Protocol):
    def handle(self, raw: bytes, peer: str) -> Awaitable[bytes | FrameAnswer | None]:
        """Answer one whole frame (None: send nothing)."""

    def oversized(self, prefix: bytes, peer: str) -> Awaitable[bytes | None]:
        """Answer a frame that broke the size cap; the connection is then closed."""

    def truncated(self, partial: bytes, peer: str, reason: str) -> Awaitable[None]:
        """Keep the bytes of a frame that was never finished (connection closed, idle)."""


@dataclass
class MllpServer:
    name: str
    host: str
    port: int
    handler: FrameHandler
    max_frame_bytes: int = 10 * 1024 * 1024
    idle_timeout: float = 300.0
    max_connections: int = 64
    allowed_peers: list[str] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False  # several processes accept on one port (acceptor processes)
    _server: asyncio.Server | None = None
    _connections: set[asyncio.Task[None]] = field(default_factory=set)
    _busy: set[asyncio.Task[None]] = field(default_factory=set)  # handling a frame right now
    _closing: bool = False

    def __post_init__(self) -> None:
        self._peers = PeerAllowList(self.allowed_peers)

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection,
            self.host,
            self.port,
            ssl=self.ssl_context,
            limit=READ_SIZE,
            reuse_port=self.reuse_port or None,
        )
        log.info("listener_started", listener=self.name, protocol="mllp", host=self.host,
                 port=self.bound_port, tls=self.ssl_context is not None)  # fmt: skip

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let messages being handled get their answer, then close everything."""
        if self._server is None:
            return
        self._server.close()
        self._closing = True
        for task in list(self._connections - self._busy):
            task.cancel()
        deadline = asyncio.get_running_loop().time() + grace
        while self._busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{addr[0]}:{addr[1]}"
        if not self._peers.allows(addr[0]):
            log.warning("peer_refused", listener=self.name, peer=peer)
            writer.close()
            return
        if len(self._connections) >= self.max_connections:
            log.warning("connection_limit_reached", listener=self.name, peer=peer,
                        limit=self.max_connections)  # fmt: skip
            writer.close()
            return
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None:
            cert = sslobj.getpeercert()
            if cert:
                cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
                peer = f"{peer} cn={cn}"
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            log.info("connection_lost", listener=self.name, peer=peer, error=type(e).__name__)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        later_tasks: set[asyncio.Task[None]] = set()
        try:
            await self._read_frames(reader, writer, peer, later_tasks)
        finally:
            for task in later_tasks:
                task.cancel()

    async def _send_later(self, writer: asyncio.StreamWriter, later: Awaitable[bytes | None]) -> None:
        answer = await later
        if answer is not None and not writer.is_closing():
            writer.write(frame(answer))
            await writer.drain()

    async def _read_frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        later_tasks: set[asyncio.Task[None]],
    ) -> None:
        buf = bytearray()
        in_frame = False
        handler = self.handler
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if in_frame and len(buf) > 1:
                    await handler.truncated(bytes(buf[1:]), peer, "connection idle in the middle of a frame")
                log.info("idle_timeout", listener=self.name, peer=peer)
                return
            if not data:
                if in_frame and len(buf) > 1:
                    await handler.truncated(bytes(buf[1:]), peer, "connection closed in the middle of a frame")
                return
            buf += data
            while True:
                if not in_frame:
                    start = buf.find(START_BLOCK)
                    if start < 0:
                        if buf.strip(b"\r\n"):
                            log.warning("junk_dropped", listener=self.name, peer=peer, size=len(buf))
                        buf.clear()
                        break
                    if start > 0:
                        if buf[:start].strip(b"\r\n"):
                            log.warning("junk_dropped", listener=self.name, peer=peer, size=start)
                        del buf[:start]
                    in_frame = True
                end = buf.find(END_BLOCK, 1)
                if end < 0 or end - 1 > self.max_frame_bytes:
                    if len(buf) - 1 > self.max_frame_bytes:
                        answer = await handler.oversized(bytes(buf[1 : self.max_frame_bytes + 1]), peer)
                        if answer is not None:
                            writer.write(frame(answer))
                            await writer.drain()
                        log.warning("frame_too_large", listener=self.name, peer=peer,
                                    limit=self.max_frame_bytes)  # fmt: skip
                        return
                    break
                payload = bytes(buf[1:end])
                del buf[: end + 1]
                if buf[:1] == CR:
                    del buf[:1]
                in_frame = False
                task = asyncio.current_task()
                assert task is not None
                self._busy.add(task)
                try:
                    reply = await handler.handle(payload, peer)
                    if isinstance(reply, FrameAnswer):
                        if reply.later is not None:
                            # Started now as its own task, so it runs even if the sender is gone.
                            pending = asyncio.ensure_future(reply.later)
                            later = asyncio.create_task(self._send_later(writer, pending))
                            later_tasks.add(later)
                            later.add_done_callback(later_tasks.discard)
                        reply = reply.now
                    if reply is not None:
                        writer.write(frame(reply))
                        await writer.drain()
                finally:
                    self._busy.discard(task)
                if self._closing:
                    return
