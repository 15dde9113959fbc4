"""Outbound MLLP: send one HL7 v2 message to a partner and check its ACK (MSA-1, MSA-2).
Persistent connections (one by default), one message in flight on each, TLS optional."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import structlog

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure

__all__ = ["MllpDestination", "parse_ack", "sent_control_id"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CR = b"\r"
ACCEPTED = frozenset({"AA", "CA"})
READ_SIZE = 64 * 1024

log = structlog.get_logger("relais.out.mllp")


class _AckTooLarge(Exception):
    pass


def _segments(message: bytes) -> list[bytes]:
    return [s for s in message.replace(b"\n", b"\r").split(b"\r") if s]


def _field_separator(message: bytes) -> bytes | None:
    if not message.startswith(b"MSH") or len(message) < 4:
        return None
    return message[3:4]


def sent_control_id(payload: bytes) -> str | None:
    """MSH-10 of an ER7 message, or None when the payload does not start with MSH."""
    sep = _field_separator(payload.lstrip(b"\r\n"))
    if sep is None:
        return None
    msh = _segments(payload.lstrip(b"\r\n"))[0]
    fields = msh.split(sep)
    # fields[0] is "MSH" and MSH-1 is the separator itself, so MSH-n is fields[n - 1]
    return fields[9].decode("latin-1").strip() if len(fields) > 9 else ""


def parse_ack(ack: bytes) -> tuple[str, str] | None:
    """(MSA-1 code, MSA-2 control ID) of an ACK, or None when it has no MSH/MSA segment."""
    ack = ack.lstrip(b"\r\n")
    sep = _field_separator(ack)
    if sep is None:
        return None
    for segment in _segments(ack):
        if segment[:3] == b"MSA" and segment[3:4] == sep:
            fields = segment.split(sep)
            code = fields[1].decode("latin-1").strip() if len(fields) > 1 else ""
            control_id = fields[2].decode("latin-1").strip() if len(fields) > 2 else ""
            return code.upper(), control_id
    return None


class _Link:
    """One connection to the partner, one message in flight on it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()  # bytes read from the partner and not yet consumed


class MllpDestination:
    """Send framed HL7 v2 messages to `host:port` and check each ACK.

    Success is MSA-1 AA or CA with MSA-2 equal to the MSH-10 that was sent. Anything else
    (AE, AR, CE, CR, another control ID, no ACK within `ack_timeout`, a connection error)
    raises TemporaryFailure; the engine retries, then dead-letters. After a timeout or a
    mismatched ACK the connection is closed, so that a late ACK is never taken for the
    answer to the next message.

    `connections` persistent connections (default 1), each with one message in flight. The
    delivery workers never send a key's next message before the previous one's outcome, so
    several connections keep the order per key; use more than one only with a partner that
    takes parallel connections.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        ack_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_ack_bytes: int = 1024 * 1024,
        connections: int = 1,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.max_ack_bytes = max_ack_bytes
        self._links = [_Link(i) for i in range(max(1, connections))]
        self.max_in_flight = len(self._links)  # one message in flight per connection
        self._idle: asyncio.Queue[_Link] = asyncio.Queue()
        for link in self._links:
            self._idle.put_nowait(link)

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        control_id = sent_control_id(delivery.payload)
        if control_id is None:
            raise PermanentFailure("payload is not an HL7 v2 message (no MSH segment)")
        if not control_id:
            raise PermanentFailure("message has no MSH-10 control ID: its ACK cannot be checked")
        link = await self._idle.get()
        try:
            outcome = await self._deliver_on(link, delivery, control_id)
        except TemporaryFailure as e:
            log.warning("mllp_delivery_failed", destination=self.name, delivery_id=delivery.delivery_id,
                        attempt=delivery.attempt, reason=str(e))  # fmt: skip
            raise
        except BaseException:
            # cancelled or broken mid-exchange: the connection's state is unknown
            await self._close_connection(link)
            raise
        finally:
            self._idle.put_nowait(link)
        log.debug("mllp_delivered", destination=self.name, delivery_id=delivery.delivery_id,
                  attempt=delivery.attempt, detail=outcome.detail)  # fmt: skip
        return outcome

    async def close(self) -> None:
        """Close every connection, once no message is in flight on it."""
        idle = [await self._idle.get() for _ in self._links]
        try:
            for link in idle:
                await self._close_connection(link)
        finally:
            for link in idle:
                self._idle.put_nowait(link)

    # -- internals ---------------------------------------------------------------------------

    async def _deliver_on(self, link: _Link, delivery: Delivery, control_id: str) -> DeliveryOutcome:
        ack = await self._exchange(link, delivery, control_id)
        parsed = parse_ack(ack)
        if parsed is None:
            await self._close_connection(link)
            raise TemporaryFailure(f"answer to {control_id} is not an ACK (no MSH/MSA segment)")
        code, acked_id = parsed
        if acked_id != control_id:
            await self._close_connection(link)
            raise TemporaryFailure(f"MSA {code} acknowledges {acked_id!r}, sent {control_id!r}")
        if code not in ACCEPTED:
            raise TemporaryFailure(f"MSA {code or '(empty)'} for {control_id}")
        return DeliveryOutcome(detail=f"MSA {code}", response=ack)

    async def _exchange(self, link: _Link, delivery: Delivery, control_id: str) -> bytes:
        reader, writer = await self._connection(link)
        try:
            async with asyncio.timeout(self.ack_timeout):
                writer.write(START_BLOCK + delivery.payload + END_BLOCK + CR)
                await writer.drain()
                return await self._read_frame(link, reader)
        except TimeoutError:
            await self._close_connection(link)
            raise TemporaryFailure(f"no ACK for {control_id} within {self.ack_timeout:g} s") from None
        except (ConnectionError, ssl.SSLError, OSError) as e:
            await self._close_connection(link)
            raise TemporaryFailure(f"connection lost waiting for the ACK to {control_id} "
                                   f"({type(e).__name__})") from None  # fmt: skip
        except _AckTooLarge:
            await self._close_connection(link)
            raise TemporaryFailure(f"ACK to {control_id} exceeds {self.max_ack_bytes} bytes") from None

    async def _read_frame(self, link: _Link, reader: asyncio.StreamReader) -> bytes:
        """One framed answer. Junk before 0x0B is dropped, and so is the CR that ends the frame,
        so that an idle connection closed by the peer is seen as such (`reader.at_eof()`)."""
        buf = link.buf
        while True:
            start = buf.find(START_BLOCK)
            junk = len(buf) if start < 0 else start
            if junk:
                if buf[:junk].strip(b"\r\n"):
                    log.warning("mllp_junk_dropped", destination=self.name, size=junk)
                del buf[:junk]
            if buf:
                end = buf.find(END_BLOCK, 1)
                if end >= 0:
                    answer = bytes(buf[1:end])
                    del buf[: end + 1]
                    while buf[:1] in (b"\r", b"\n"):
                        del buf[:1]
                    return answer
                if len(buf) > self.max_ack_bytes:
                    raise _AckTooLarge
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("connection closed by the peer")
            buf += data

    async def _connection(self, link: _Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if link.reader is not None and link.writer is not None:
            await asyncio.sleep(0)  # let a pending EOF from an idle peer be seen
            if link.buf:
                reason = "unexpected data after the last ACK"
            elif link.reader.at_eof() or link.writer.is_closing():
                reason = "peer closed the idle connection"
            else:
                return link.reader, link.writer
            log.info("mllp_reconnect", destination=self.name, connection=link.number, reason=reason)
            await self._close_connection(link)
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=(self.server_hostname or self.host) if self.ssl_context else None,
                )
        except TimeoutError:
            raise TemporaryFailure(
                f"cannot connect to {self.host}:{self.port} within {self.connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as e:
            detail = f"cannot connect to {self.host}:{self.port} ({type(e).__name__})"
            raise TemporaryFailure(detail) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.reader, link.writer = reader, writer
        log.info("mllp_connected", destination=self.name, host=self.host, port=self.port,
                 connection=link.number, tls=self.ssl_context is not None)  # fmt: skip
        return reader, writer

    async def _close_connection(self, link: _Link) -> None:
        writer, link.reader, link.writer = link.writer, None, None
        link.buf.clear()
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
