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
import os
import signal
from collections.abc import Callable
from typing import Any

import structlog

from engine import loop as event_loop
from engine.child import Child, InChild
from engine.config import RelaisConfig
from engine.ingest import Appendix, Ingestor, IngestUnavailable, Receipt, Submission
from engine.tasks import cancel_and_wait
from engine.wire import (
    blob_synced,
    pack_appendix,
    pack_receipt,
    pack_submission,
    read_frame,
    send,
    send_alive,
    unpack_appendix,
    unpack_receipt,
    unpack_submission,
)

__all__ = ["WriterProcess"]

log = structlog.get_logger("relais.writer_process")


def _writer_main(config: RelaisConfig, socket_path: str) -> None:
    """The body of the writer process."""
    from engine.logs import configure_logging, name_process

    configure_logging(config.log.level, config.log.format)
    name_process("relais-writer")
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
                send(writer, ("committed", 0, None))

        async def answer(request_id: int, work: Any) -> None:
            try:
                result = ("ok", await work)
            except IngestUnavailable as e:
                result = ("unavailable", str(e))
            send(writer, ("answer", request_id, result))

        async def submit(body: Any) -> Any:
            return pack_receipt(await ingestor.submit(unpack_submission(body)))

        tasks: set[asyncio.Task[None]] = set()
        notifying = asyncio.create_task(notify())
        send(writer, ("ready", 0, os.getpid()))
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
            send(writer, ("stopped", 0, None))
            await writer.drain()
        writer.close()
        await asyncio.to_thread(store.close)

    event_loop.run(run())


class WriterProcess(InChild):
    """In the engine's process: the writer's `submit`, `append`, `commit_signal` and
    `on_commit`, carried out by the writer process."""

    def __init__(self, config: RelaisConfig, start_timeout: float = 60.0) -> None:
        self.config = config
        self.child = Child("writer_process", _writer_main, lambda path: (self.config, path), self._serve, start_timeout)
        self._stopped = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], Appendix | None]] = {}
        self._signals: list[asyncio.Event] = []
        self._watchers: list[Callable[[list[Appendix]], None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def commit_signal(self) -> asyncio.Event:
        signal_ = asyncio.Event()
        self._signals.append(signal_)
        return signal_

    def on_commit(self, watcher: Callable[[list[Appendix]], None]) -> None:
        """As `Ingestor.on_commit`; called with no appendix after a restart of the writer
        process, whose last commits may have gone unanswered: read the store again."""
        self._watchers.append(watcher)

    async def start(self) -> None:
        await self.child.listen()
        await self.child.spawn()
        self._supervisor = asyncio.create_task(
            self.child.supervise(self._died, self._restarted), name="relais-writer-supervise"
        )

    async def submit(self, submission: Submission) -> Receipt:
        await blob_synced(submission)
        return unpack_receipt(await self._call("submit", pack_submission(submission), None))

    async def append(self, appendix: Appendix) -> None:
        await self._call("append", pack_appendix(appendix), appendix)

    async def _call(self, kind: str, body: Any, appendix: Appendix | None) -> Any:
        link = self.child.link
        if link is None or link.is_closing() or self._stopping:
            raise IngestUnavailable("the writer process is not running")
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (fut, appendix)
        send(link, (kind, request_id, body))
        status, value = await fut
        if status != "ok":
            raise IngestUnavailable(value)
        return value

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, request_id, body = await read_frame(reader)
                self.child.heard(writer)
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
                    self.child.connected(writer, body)
                elif kind == "stopped":
                    self._stopped.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            if writer is self.child.link:
                self.child.link = None
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

    async def _died(self) -> None:
        self._fail_waiting("the writer process died")

    def _restarted(self) -> None:
        # What the dead process committed without answering was never seen by the
        # watchers: they read the store again.
        for watcher in self._watchers:
            watcher([])

    async def stop(self) -> None:
        """Commit what was sent, then stop the writer process."""
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        self._stopping = True
        link = self.child.link
        if self.child.proc is not None and link is not None and not link.is_closing():
            send(link, ("stop", 0, None))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self._stopped.wait()
        await self.child.end(terminate=False)
        self._fail_waiting("the writer process stopped")
        self.child.close()
