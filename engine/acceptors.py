"""Acceptor processes: MLLP and DICOM listeners and their intake in worker processes, one writer.

One Python process is bound by one GIL: framing, parsing and ACK building compete with
the writer. With `[ingest] acceptors = N`, N processes listen on the same ports
(SO_REUSEPORT), parse and answer, and hand each submission to the main process over a
Unix socket; the main process commits it (group commit, as always) and only then sends
the receipt back. Nothing is acknowledged before it is durable, whichever process ACKs.
A DICOM instance's blob is placed and synced by the acceptor before its submission leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing as mp
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from engine import loop as event_loop
from engine.config import DicomListener, MllpListener, RelaisConfig
from engine.ingest import IngestUnavailable, Receipt, Submission, Writer
from engine.wire import blob_synced, pack_receipt, pack_submission, read_frame, send, unpack_receipt, unpack_submission
from event_store.blobs import remove_incomplete_writes

__all__ = ["AcceptorPool", "IngestGateway", "RemoteIngestor"]

log = structlog.get_logger("relais.acceptors")


class IngestGateway:
    """In the main process: takes submissions from acceptors, answers once committed."""

    def __init__(
        self,
        path: Path,
        ingestor: Writer,
        decisions: Callable[[uuid.UUID], Awaitable[Any]] | None,
    ) -> None:
        self.path = path
        self.ingestor = ingestor
        self.decisions = decisions
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, request_id, body = await read_frame(reader)
                task = asyncio.create_task(self._answer(writer, kind, request_id, body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, kind: str, request_id: int, body: Any) -> None:
        result: Any
        try:
            if kind == "submit":
                result = ("ok", pack_receipt(await self.ingestor.submit(unpack_submission(body))))
            elif self.decisions is not None:
                result = ("ok", await self.decisions(body))
            else:
                result = ("ok", None)
        except IngestUnavailable as e:
            result = ("unavailable", str(e))
        send(writer, (request_id, result))


class RemoteIngestor:
    """In an acceptor: the Ingestor's `submit` (and the router's decisions) over the socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                request_id, result = await read_frame(reader)
                fut = self._waiting.pop(request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(IngestUnavailable("the writer process is gone"))
            self._waiting.clear()
            self.closed.set()

    async def _call(self, kind: str, body: Any) -> Any:
        if self._writer is None or self.closed.is_set():
            raise IngestUnavailable("the writer process is gone")
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        send(self._writer, (kind, request_id, body))
        status, value = await fut
        if status != "ok":
            raise IngestUnavailable(value)
        return value

    async def submit(self, submission: Submission) -> Receipt:
        await blob_synced(submission)
        return unpack_receipt(await self._call("submit", pack_submission(submission)))

    async def decision(self, message_id: uuid.UUID) -> Any:
        return await self._call("decision", message_id)


def _acceptor_main(config: RelaisConfig, socket_path: str, number: int, routing: bool) -> None:
    """The body of one acceptor process."""
    from engine.app import listener_servers, server_ssl_context
    from engine.dicom_intake import dicom_servers
    from engine.logs import configure_logging, name_process
    from event_store.blobs import BlobStore

    configure_logging(config.log.level, config.log.format)
    name_process(f"relais-accept{number}")

    async def run() -> None:
        remote = RemoteIngestor(Path(socket_path))
        await remote.connect()
        servers: list[Any] = listener_servers(config, remote, remote.decision if routing else None, reuse_port=True)
        blobs = None
        if config.listeners.dicom:
            blobs = BlobStore(config.resolve(config.store.blob_dir))
            ssl_of = functools.partial(server_ssl_context, config=config)
            inline_limit = config.store.inline_payload_limit
            servers += dicom_servers(config.listeners.dicom, remote, blobs, ssl_of, inline_limit, reuse_port=True)
        for server in servers:
            await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("acceptor_started", acceptor=number, pid=os.getpid())
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(remote.closed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        for server in servers:
            await server.stop()
        if blobs is not None:
            blobs.close()  # waits for the syncs under way

    event_loop.run(run())


class AcceptorPool:
    """Starts, watches (restarts one that dies) and stops the acceptor processes."""

    def __init__(self, config: RelaisConfig, socket_path: Path, count: int, routing: bool) -> None:
        self.config = config
        self.socket_path = socket_path
        self.count = count
        self.routing = routing
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._watch: asyncio.Task[None] | None = None
        self._placeholders: list[socket.socket] = []

    def _resolve_ports(self) -> RelaisConfig:
        """Listeners on port 0 get a real port first, shared by every acceptor."""
        resolved: dict[str, list[Any]] = {}
        for kind in ("mllp", "dicom"):
            resolved[kind] = []
            for listener in getattr(self.config.listeners, kind):
                if listener.port == 0:
                    sock = socket.socket(socket.AF_INET6 if ":" in listener.host else socket.AF_INET)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind((listener.host, 0))
                    self._placeholders.append(sock)  # bound, never listening: takes no connection
                    listener = listener.model_copy(update={"port": sock.getsockname()[1]})
                resolved[kind].append(listener)
        return self.config.model_copy(update={"listeners": self.config.listeners.model_copy(update=resolved)})

    def _spawn(self, number: int) -> Any:
        proc = self._ctx.Process(
            target=_acceptor_main,
            args=(self.config, str(self.socket_path), number, self.routing),
            name=f"relais-acceptor-{number}",
            daemon=True,
        )
        proc.start()
        return proc

    async def start(self) -> RelaisConfig:
        self.config = self._resolve_ports()
        self._procs = [self._spawn(n) for n in range(self.count)]
        await self._wait_listening()
        for sock in self._placeholders:
            sock.close()
        self._watch = asyncio.create_task(self._supervise())
        return self.config

    async def _wait_listening(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        listeners: list[MllpListener | DicomListener] = [*self.config.listeners.mllp, *self.config.listeners.dicom]
        for listener in listeners:
            while True:
                try:
                    _, writer = await asyncio.open_connection(listener.host, listener.port)
                    writer.close()
                    break
                except OSError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise RuntimeError(f"acceptors did not start listening on {listener.port}") from None
                    if not all(p.is_alive() for p in self._procs):
                        raise RuntimeError("an acceptor process died while starting") from None
                    await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for n, proc in enumerate(self._procs):
                if not proc.is_alive():
                    log.error("acceptor_died", acceptor=n, exitcode=proc.exitcode)
                    self._procs[n] = self._spawn(n)
                    # What it was receiving (spooled DICOM files, blobs half-written) was never
                    # acknowledged: gone now, not at the next start of Relais.
                    blob_dir = self.config.resolve(self.config.store.blob_dir)
                    removed = await asyncio.to_thread(remove_incomplete_writes, blob_dir)
                    if removed:
                        log.warning("incomplete_blob_writes_removed", count=removed, acceptor=n)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: stop listening, answer what is in flight
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        self._procs = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]
