"""The single writer in its own process (`[ingest] writer_process = true`).

In one process the writer's commit competes for the GIL with the event loop (MLLP intake,
delivery, the router's link): sqlite3 hands the GIL back at every prepare and step of a
statement, and a commit of ~4 ms of CPU took ~10 ms (bench/RESULTS.md §19). Here the
writer process does nothing else: it reads submissions and appendices from the engine's
process over a Unix socket, commits them in groups on its own event loop, and only then
answers. Nothing is acknowledged before it is durable: the engine's process answers its
clients when the writer's answer comes back. The engine's process keeps the store's
writer lock and WAL checkpoints; the writer process is its child, the only one that
appends, and dies with it. A writer process that dies is started again; what was waiting
for it is answered 'not stored' (NAK, 4xx/5xx: the sender resends).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing as mp
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from engine.config import RelaisConfig
from engine.ingest import Appendix, Ingestor, IngestUnavailable, Receipt, Submission
from engine.tasks import cancel_and_wait
from engine.wire import (
    HANG_TIMEOUT,
    blob_synced,
    frame,
    kill_if_hung,
    pack_appendix,
    pack_receipt,
    pack_submission,
    read_frame,
    send_alive,
    unpack_appendix,
    unpack_receipt,
    unpack_submission,
)

__all__ = ["WriterProcess"]

log = structlog.get_logger("relais.writer_process")


def _writer_main(config: RelaisConfig, socket_path: str) -> None:
    """The body of the writer process."""
    from engine.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    # The engine's process decides when to stop (a terminal's Ctrl-C reaches both): it
    # sends 'stop' once nothing more can come, or its socket closes when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def run() -> None:
        store = await asyncio.to_thread(functools.partial(config.open_store, checkpoints=False))
        cfg = config.ingest
        ingestor = Ingestor(
            store, batch_window_ms=cfg.batch_window_ms, max_batch=cfg.max_batch, max_pending=cfg.max_pending,
            on_loop=True,
        )  # fmt: skip
        await ingestor.start()
        reader, writer = await asyncio.open_unix_connection(socket_path)
        committed = ingestor.commit_signal()

        async def notify() -> None:  # the engine's followers (router...) wake on commits
            while True:
                await committed.wait()
                committed.clear()
                writer.write(frame(("committed", 0, None)))

        async def answer(request_id: int, work: Any) -> None:
            try:
                result = ("ok", await work)
            except IngestUnavailable as e:
                result = ("unavailable", str(e))
            writer.write(frame(("answer", request_id, result)))

        async def submit(body: Any) -> Any:
            return pack_receipt(await ingestor.submit(unpack_submission(body)))

        tasks: set[asyncio.Task[None]] = set()
        notifying = asyncio.create_task(notify())
        writer.write(frame(("ready", 0, os.getpid())))
        beating = asyncio.create_task(send_alive(writer))
        try:
            while True:
                kind, request_id, body = await read_frame(reader)
                if kind == "stop":
                    break
                work = submit(body) if kind == "submit" else ingestor.append(unpack_appendix(body))
                task = asyncio.create_task(answer(request_id, work))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the engine's process is gone: commit what came, then stop
        await ingestor.stop()  # what was queued is committed first
        if tasks:
            await asyncio.wait(set(tasks), timeout=10)
        await cancel_and_wait(notifying)
        await cancel_and_wait(beating)
        with contextlib.suppress(ConnectionError):
            writer.write(frame(("stopped", 0, None)))
            await writer.drain()
        writer.close()
        await asyncio.to_thread(store.close)

    asyncio.run(run())


class WriterProcess:
    """In the engine's process: the writer's `submit`, `append`, `commit_signal` and
    `on_commit`, carried out by the writer process."""

    def __init__(self, config: RelaisConfig, start_timeout: float = 60.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.hang_timeout = HANG_TIMEOUT
        self.restarts = 0
        self._alive_at = 0.0  # loop time of the last frame from the process
        self._ctx = mp.get_context("spawn")
        self._dir = Path(tempfile.mkdtemp(prefix="relais-"))  # Unix socket paths: ~100 bytes at most
        self.path = self._dir / "writer.sock"
        self._server: asyncio.Server | None = None
        self._proc: Any = None
        self._link: asyncio.StreamWriter | None = None
        self._connected: asyncio.Queue[tuple[asyncio.StreamWriter, int]] = asyncio.Queue()
        self._stopped = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], Appendix | None]] = {}
        self._signals: list[asyncio.Event] = []
        self._watchers: list[Callable[[list[Appendix]], None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def commit_signal(self) -> asyncio.Event:
        signal_ = asyncio.Event()
        self._signals.append(signal_)
        return signal_

    def on_commit(self, watcher: Callable[[list[Appendix]], None]) -> None:
        """As `Ingestor.on_commit`; called with no appendix after a restart of the writer
        process, whose last commits may have gone unanswered: read the store again."""
        self._watchers.append(watcher)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="relais-writer-supervise")

    async def submit(self, submission: Submission) -> Receipt:
        await blob_synced(submission)
        return unpack_receipt(await self._call("submit", pack_submission(submission), None))

    async def append(self, appendix: Appendix) -> None:
        await self._call("append", pack_appendix(appendix), appendix)

    async def _call(self, kind: str, body: Any, appendix: Appendix | None) -> Any:
        link = self._link
        if link is None or link.is_closing() or self._stopping:
            raise IngestUnavailable("the writer process is not running")
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (fut, appendix)
        link.write(frame((kind, request_id, body)))
        status, value = await fut
        if status != "ok":
            raise IngestUnavailable(value)
        return value

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                kind, request_id, body = await read_frame(reader)
                if writer is self._link:
                    self._alive_at = loop.time()
                if kind == "answer":
                    fut, appendix = self._waiting.pop(request_id, (None, None))
                    if appendix is not None and body[0] == "ok":
                        self._committed(appendix)
                    if fut is not None and not fut.done():
                        fut.set_result(body)
                elif kind == "committed":
                    for signal_ in self._signals:
                        signal_.set()
                elif kind == "ready":
                    self._connected.put_nowait((writer, body))
                elif kind == "stopped":
                    self._stopped.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            if writer is self._link:
                self._link = None
                self._fail_waiting("the writer process is gone")

    def _committed(self, appendix: Appendix) -> None:
        for watcher in self._watchers:
            try:
                watcher([appendix])
            except Exception as e:  # a watcher's bug must not cost the callers their answers
                log.error("commit_watcher_failed", error=type(e).__name__, detail=str(e)[:200])
        for signal_ in self._signals:  # the notice of this commit may have come first
            signal_.set()

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut, _ in waiting.values():
            if not fut.done():
                fut.set_result(("unavailable", why))

    async def _spawn(self) -> None:
        while not self._connected.empty():
            self._connected.get_nowait()
        self._proc = self._ctx.Process(
            target=_writer_main, args=(self.config, str(self.path)), name="relais-writer", daemon=True
        )
        self._proc.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            try:
                async with asyncio.timeout(0.2):
                    writer, pid = await self._connected.get()
            except TimeoutError:
                if not self._proc.is_alive():
                    raise RuntimeError(
                        f"the writer process exited while starting (code {self._proc.exitcode})"
                    ) from None
                if loop.time() > deadline:
                    raise RuntimeError("the writer process did not start in time") from None
                continue
            if pid == self._proc.pid:
                self._link = writer
                self._alive_at = loop.time()
                return

    async def _supervise(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(0.2)
            if self._proc.is_alive():
                kill_if_hung(self._proc, self._alive_at, self.hang_timeout, "writer_process")
                continue
            log.error("writer_process_died", exitcode=self._proc.exitcode, restarts=self.restarts)
            self._link = None
            self._fail_waiting("the writer process died")
            try:
                await self._spawn()
            except Exception as e:  # keep trying, loudly: nothing is stored meanwhile
                log.error("writer_process_not_started", error=type(e).__name__, detail=str(e)[:200])
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            self.restarts += 1
            delay = 0.5
            log.warning("writer_process_restarted", pid=self._proc.pid, restarts=self.restarts)
            # What the dead process committed without answering was never seen by the
            # watchers: they read the store again.
            for watcher in self._watchers:
                watcher([])

    async def stop(self) -> None:
        """Commit what was sent, then stop the writer process."""
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        self._stopping = True
        if self._proc is not None:
            link = self._link
            if link is not None and not link.is_closing():
                link.write(frame(("stop", 0, None)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await self._stopped.wait()
            await asyncio.to_thread(self._proc.join, 10)
            if self._proc.is_alive():
                self._proc.kill()
                await asyncio.to_thread(self._proc.join, 5)
            self._proc = None
        self._fail_waiting("the writer process stopped")
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._dir.rmdir()
