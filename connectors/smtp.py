"""MSSanté's SMTP edge: aiosmtpd's protocol hosted on Relais's own event loop, with
STARTTLS and AUTH required and DATA read in bulk. What a mail means is the handler's call.

    >>> server = SmtpServer("smtp", "127.0.0.1", 2525, handler, tls_context=ctx, accounts=accounts)
    >>> await server.start(); ...; await server.stop()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import socket
import ssl
import time
import weakref
from collections.abc import Mapping
from typing import Any, Protocol, cast

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from connectors.peers import PeerAllowList

__all__ = ["MailHandler", "PasswordCheck", "RelaisSMTP", "SmtpServer", "hash_password", "verify_password"]

log = structlog.get_logger("relais.smtp")

END_OF_DATA = b"\r\n.\r\n"
_RECORDING: set[asyncio.Task[None]] = set()  # refusals being recorded after their session ended
_SIMPLE_ADDRESS = re.compile(r"\s*<([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>(.*)\Z", re.S)


# -- passwords -----------------------------------------------------------------------------


def hash_password(password: str, *, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    """`scrypt$n$r$p$salt$hash` (base64), the form `config.toml` keeps for SMTP accounts."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches a `scrypt$...` or `pbkdf2_sha256$...` hash."""
    try:
        kind, *parts = stored.split("$")
        if kind == "scrypt":
            n, r, p, salt, expected = int(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4]
            digest = hashlib.scrypt(
                password.encode(), salt=base64.b64decode(salt), n=n, r=r, p=p, maxmem=128 * r * n * 2, dklen=32
            )
        elif kind == "pbkdf2_sha256":
            iterations, salt, expected = int(parts[0]), parts[1], parts[2]
            digest = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), iterations)
        else:
            return False
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, IndexError):
        return False


LOCKED_OUT = "454 4.7.0 Too many failed authentications, try again later"
_DUMMY_HASH = "pbkdf2_sha256$1000$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


class PasswordCheck:
    """aiosmtpd authenticator over hashed passwords (PLAIN and LOGIN). A verified password
    is remembered (as a keyed digest) so a client that opens many sessions does not pay
    the scrypt cost, on the event loop, each time."""

    # Each wrong password costs a scrypt on the event loop (~50 ms): a peer that keeps
    # failing is refused without hashing for a while, so it cannot stall every session.
    max_failures = 10
    failure_window = 60.0

    def __init__(self, accounts: Mapping[str, str]) -> None:
        self.accounts = dict(accounts)
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()
        self._failures: dict[str, tuple[int, float]] = {}  # peer IP -> (count, window start)

    def _locked_out(self, peer: str) -> bool:
        count, since = self._failures.get(peer, (0, 0.0))
        if time.monotonic() - since > self.failure_window:
            self._failures.pop(peer, None)
            return False
        return count >= self.max_failures

    def _failed(self, peer: str) -> None:
        count, since = self._failures.get(peer, (0, 0.0))
        now = time.monotonic()
        if now - since > self.failure_window:
            count, since = 0, now
        self._failures[peer] = (count + 1, since)
        if len(self._failures) > 10_000:  # many peers: forget the oldest windows
            for key in sorted(self._failures, key=lambda k: self._failures[k][1])[:5000]:
                del self._failures[key]

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        peer = str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)
        if self._locked_out(peer):
            log.warning("smtp_auth_locked_out", peer=peer, mechanism=mechanism)
            return AuthResult(success=False, handled=False, message=LOCKED_OUT)
        stored = self.accounts.get(user)
        token = hmac.new(self._key, f"{user}\0{password}\0{stored}".encode(), "sha256").digest()
        if stored is not None and token in self._verified:
            return AuthResult(success=True, auth_data=user)
        ok = verify_password(password, stored or _DUMMY_HASH) and stored is not None
        if not ok:
            self._failed(peer)
            log.warning("smtp_auth_failed", peer=peer, mechanism=mechanism)
            return AuthResult(success=False, handled=False)
        self._verified.add(token)
        return AuthResult(success=True, auth_data=user)


# -- the protocol --------------------------------------------------------------------------


class MailHandler(Protocol):
    """What the server needs beyond aiosmtpd's hooks: a say on mail it refused for size."""

    async def handle_oversized(self, server: SMTP, session: Session, envelope: Envelope, head: bytes, size: int) -> str:
        """Record the refusal; return the status line to send (552 ...)."""


class RelaisSMTP(SMTP):
    """aiosmtpd's state machine with a bulk DATA reader: it reads up to `<CRLF>.<CRLF>` in
    64 KB chunks instead of line by line (aiosmtpd spends most of its time there on large
    mails). Only `<CRLF>.<CRLF>` ends the data, so a bare `<LF>.<LF>` or `<LF>.<CRLF>`
    cannot smuggle a second mail; leading dots are undone per RFC 5321 4.5.2."""

    # Set by SmtpServer: says why a new connection is refused (a full status line), or None.
    admission: Any = None
    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self.admission is not None:  # a new connection, not STARTTLS
            refusal = self.admission(self, transport.get_extra_info("peername"))
            if refusal is not None:
                self._refused = True
                # A stream transport (uvloop's are not asyncio.WriteTransport subclasses).
                writer = cast(asyncio.Transport, transport)
                writer.write(refusal.encode() + b"\r\n")
                writer.close()
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        super().connection_lost(error)
        if self.admission is not None:
            self.admission(self, None)  # gone: frees its place

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common `<local@domain>` without quotes or comments, without the RFC 5322 parser
        # (~0.2 ms a call); anything else goes to aiosmtpd's own parsing.
        m = _SIMPLE_ADDRESS.match(arg)
        if m is None:
            return super()._getaddr(arg)
        if self.local_part_limit and len(m.group(1).rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return m.group(1), m.group(2)

    def _cut_off(self, partial: bytes, size: int) -> None:
        """DATA ended without `<CRLF>.<CRLF>`: let the handler record what came (in a task of
        its own: this one is being cancelled). Nothing was acknowledged."""
        record = getattr(self.event_handler, "handle_cut_off", None)
        if record is None or self.session is None or self.envelope is None:
            return
        task = self.loop.create_task(record(self.session, self.envelope, partial, max(size, len(partial))))
        _RECORDING.add(task)
        task.add_done_callback(_RECORDING.discard)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or 0
        reader = self._reader
        saved_limit = reader._limit  # type: ignore[attr-defined]
        # The command reader keeps ~2 KB buffered before pausing the socket; DATA wants more.
        reader._limit = 1 << 18  # type: ignore[attr-defined]
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command: lets an empty mail end
        head = b""
        size = 0
        too_big = False
        body = b""
        # Clients with Nagle's algorithm on (smtplib, most MTAs) hold a mail's last small
        # segment until its predecessors are ACKed; a delayed ACK then costs ~40 ms per mail.
        raw_socket = self.transport.get_extra_info("socket") if self.transport else None
        quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            while True:
                if raw_socket is not None and quickack is not None:
                    with contextlib.suppress(OSError):
                        raw_socket.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                try:
                    chunk = await reader.read(1 << 16)
                except asyncio.CancelledError:  # closed by the client, or by the idle timeout
                    self._cut_off(head if too_big else bytes(buf[2:]), size)
                    raise
                if not chunk:
                    self._cut_off(head if too_big else bytes(buf[2:]), size)
                    return  # nothing was promised
                self._reset_timeout()
                start = max(0, len(buf) - 4)
                buf += chunk
                end = buf.find(END_OF_DATA, start)
                if end < 0:
                    size += len(chunk)
                    if limit and size > limit:
                        if not too_big:
                            head = bytes(buf[2 : 2 + 65536])
                            too_big = True
                        del buf[:-4]  # keep only what may start the terminator
                    continue
                rest = bytes(buf[end + 5 :])
                if rest:  # pipelined commands after the data go back to the command reader
                    reader._buffer[:0] = rest  # type: ignore[attr-defined]
                if not too_big:
                    size = end  # the mail's bytes, its last CRLF included
                if too_big or (limit and size > limit):
                    status = await self.event_handler.handle_oversized(self, self.session, self.envelope, head, size)
                    self._set_post_data_state()
                    await self.push(status)
                    return
                body = bytes(buf[2 : end + 2])
                break
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        del buf
        if body.startswith(b"."):
            body = body[1:]
        if b"\r\n." in body:  # most mails (base64) have no line starting with a dot
            body = body.replace(b"\r\n.", b"\r\n")
        self.envelope.content = body
        self.envelope.original_content = body
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)


class SmtpServer:
    """One SMTP listener on the running loop (`loop.create_server`, no thread of its own)."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        handler: Any,
        *,
        hostname: str,
        tls_context: ssl.SSLContext,
        authenticator: PasswordCheck,
        data_size_limit: int,
        timeout: float,
        max_connections: int = 64,
        allowed_peers: list[str] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.handler = handler
        self.hostname = hostname
        self.tls_context = tls_context
        self.authenticator = authenticator
        self.data_size_limit = data_size_limit
        self.timeout = timeout
        self.max_connections = max_connections
        self._peers = PeerAllowList(allowed_peers or [])
        self._server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[RelaisSMTP] = weakref.WeakSet()
        self._open: set[RelaisSMTP] = set()

    def _admission(self, session: RelaisSMTP, peer: Any) -> str | None:
        if peer is None:
            self._open.discard(session)
            return None
        if not self._peers.allows(peer[0] if peer else ""):
            log.warning("smtp_peer_refused", listener=self.name, peer=str(peer[0] if peer else ""))
            return "554 5.7.1 Connections from this address are not accepted"
        if len(self._open) >= self.max_connections:
            log.warning("smtp_too_many_connections", listener=self.name, limit=self.max_connections)
            return "421 4.7.0 Too many connections, try again later"
        self._open.add(session)
        return None

    def _protocol(self) -> RelaisSMTP:
        session = RelaisSMTP(
            self.handler,
            hostname=self.hostname,
            ident="Relais ESMTP",
            tls_context=self.tls_context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=self.authenticator,
            data_size_limit=self.data_size_limit,
            timeout=self.timeout,
            loop=asyncio.get_running_loop(),
        )
        session.admission = self._admission
        self.sessions.add(session)
        return session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, self.port)
        log.info("smtp_listening", listener=self.name, host=self.host, port=self.bound_port)

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        try:
            async with asyncio.timeout(5):
                await self._server.wait_closed()
        except TimeoutError:
            pass
        self._server = None
