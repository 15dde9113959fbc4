"""The router in its own process (`[routing] process = true`): its reads and its planning
(ER7 parsing, transforms) and the delivery workers leave the GIL of the process that takes
messages in and commits.

The router process opens its own read connection to the store and runs the same `Router`
and `DeliveryWorkers`; what they derive (events, payloads, outbox rows and the router's
tracking position: `Appendix`es) goes over a Unix socket to the main process's single
writer, which commits it and only then answers. The delivery workers see their own
commits (an operator's redeliver too: they carry it out), and the outbox rows the main
process commits on its own account (the study router's) are sent to them after each
commit. Exactly once across restarts as in one process: the position commits with what
it derived, and a new router process starts only once everything the previous one sent
has been committed or refused (a delivery under way when it died is attempted again: at
least once, as after any crash). The main process completes the routing decisions
(HL7 application ACKs) when it commits them, and watches the process: one that dies is
logged and started again. The search index (engine/indexer.py) follows the log in the
router process too.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from engine import loop as event_loop
from engine.child import Child, InChild
from engine.config import RelaisConfig
from engine.ingest import Appendix, IngestUnavailable, Writer
from engine.outbox import OUTBOX_INSERT, OUTBOX_REOPEN, OUTBOX_UPDATE
from engine.router import RoutingDecisions
from engine.routes import Channel
from engine.tasks import cancel_and_wait
from engine.wire import pack_appendix, read_frame, send, send_alive, unpack_appendix

__all__ = ["RemoteAppender", "RouterProcess"]

_OUTBOX_STATEMENTS = frozenset({OUTBOX_INSERT, OUTBOX_UPDATE, OUTBOX_REOPEN})

log = structlog.get_logger("relais.router_process")


class RemoteAppender:
    """In the router process: the Ingestor's `append`, `commit_signal` and `on_commit` over
    the socket. The appends of one turn of the loop (a batch of delivery outcomes) go as one
    frame and come back as one answer; the main process commits each on its own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[tuple[Appendix, asyncio.Future[None]]]] = {}
        self._unsent: list[tuple[Appendix, asyncio.Future[None]]] = []
        self._signals: list[asyncio.Event] = []
        self._watchers: list[Callable[[list[Appendix]], None]] = []
        self.channels: asyncio.Queue[tuple[int, list[Channel]]] = asyncio.Queue()
        self.closed = asyncio.Event()

    def commit_signal(self) -> asyncio.Event:
        signal_ = asyncio.Event()
        self._signals.append(signal_)
        return signal_

    def on_commit(self, watcher: Callable[[list[Appendix]], None]) -> None:
        """`watcher` sees this process's appendices once committed, before their appends
        return, and the outbox's statements of the main process's own commits."""
        self._watchers.append(watcher)

    async def append(self, appendix: Appendix) -> None:
        # The writer process gone (stopped or killed), this process stops too: an append
        # waits until the router is cancelled. Whether the writer committed it or not, the
        # next router process reads the position that was committed.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_appends)
        self._unsent.append((appendix, fut))
        await fut

    def _send_appends(self) -> None:
        batch: list[tuple[Appendix, asyncio.Future[None]]] = []
        packed: list[Any] = []
        for appendix, fut in self._unsent:
            try:
                packed.append(pack_appendix(appendix))
            except Exception as e:  # an event that cannot be encoded: its caller is told, not left waiting
                fut.set_exception(IngestUnavailable(f"not encodable: {type(e).__name__}"))
                continue
            batch.append((appendix, fut))
        self._unsent = []
        if batch:
            request_id = next(self._ids)
            self._waiting[request_id] = batch
            send(self._writer, ("append", request_id, packed))

    def _appended(self, request_id: int, results: list[tuple[str, Any]]) -> None:
        batch = self._waiting.pop(request_id, [])
        self._committed([a for (a, _), (status, _) in zip(batch, results, strict=True) if status == "ok"])
        for (_, fut), (status, value) in zip(batch, results, strict=True):
            if fut.done():
                continue
            if status == "ok":
                fut.set_result(None)
            else:
                fut.set_exception(IngestUnavailable(value))

    def _committed(self, appendices: list[Appendix], *, unseen: bool = False) -> None:
        """Watchers first (the delivery workers' outbox index), then the commit signals.
        `unseen`: commits went by unseen (this process's start, a restart of the main
        process's writer process), the watchers get [] and read the outbox again."""
        if appendices or unseen:
            for watcher in self._watchers:
                try:
                    watcher(appendices)
                except Exception as e:  # a watcher's bug must not cost the appends their answers
                    log.error("commit_watcher_failed", error=type(e).__name__, detail=str(e)[:200])
        for signal_ in self._signals:
            signal_.set()

    def answer(self, request_id: int, body: Any) -> None:
        send(self._writer, ("answer", request_id, body))

    async def read(self) -> None:
        """Answers to our appends, commit notices and new channels from the main process."""
        try:
            while True:
                kind, request_id, body = await read_frame(self._reader)
                if kind == "answer":
                    self._appended(request_id, body)
                elif kind == "committed":
                    self._committed([])
                elif kind == "outbox":  # the main process's own changes to the outbox
                    self._committed([Appendix(statements=body)] if body else [], unseen=not body)
                elif kind == "channels":
                    self.channels.put_nowait((request_id, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()


def _router_main(config: RelaisConfig, socket_path: str, channels: list[Channel]) -> None:
    """The body of the router process."""
    from engine.delivery import DeliveryWorkers
    from engine.indexer import SearchIndexer
    from engine.logs import configure_logging, name_process
    from engine.router import Router
    from engine.targets import build_targets

    configure_logging(config.log.level, config.log.format)
    name_process("relais-router")

    async def run() -> None:
        store = await asyncio.to_thread(functools.partial(config.open_store, checkpoints=False))
        reader, writer = await asyncio.open_unix_connection(socket_path)
        remote = RemoteAppender(reader, writer)
        reading = asyncio.create_task(remote.read())
        router = Router(store, remote, channels)
        await router.start()
        # The search index follows the log here too: its reads and decoding are CPU the
        # engine's process, the busiest, does not spend (bench/RESULTS.md §23).
        indexer = SearchIndexer(store, remote)
        await indexer.start()
        # Delivery too: the attempts and their outcomes are the engine's third of the work
        # per message (bench/RESULTS.md §25); what they record goes to the writer as above.
        delivery = DeliveryWorkers(
            store, remote, build_targets(channels, store, remote), config.routing.delivery_concurrency
        )
        await delivery.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        remote.answer(0, ("ready", os.getpid()))
        beating = asyncio.create_task(send_alive(writer))
        log.info("router_process_started", pid=os.getpid(), position=router.position)

        async def reloads() -> None:
            while True:
                request_id, new = await remote.channels.get()
                try:
                    targets = build_targets(new, store, remote)
                except Exception as e:
                    remote.answer(request_id, ("refused", f"{type(e).__name__}: {e}"))
                    continue
                router.reload(new)
                await delivery.reload(targets)
                remote.answer(request_id, ("ok", [c.name for c in new]))

        reloading = asyncio.create_task(reloads())
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(remote.closed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await router.stop()
        await delivery.stop()  # the attempts under way end and are recorded first
        await indexer.stop()
        await cancel_and_wait(reloading)
        await cancel_and_wait(beating)
        writer.close()
        await cancel_and_wait(reading)
        await asyncio.to_thread(store.close)

    event_loop.run(run())


class RouterProcess(InChild):
    """In the main process: starts the router process, commits what it sends, completes
    the routing decisions, passes new channels on, and restarts the process if it dies."""

    def __init__(
        self,
        config: RelaisConfig,
        ingestor: Writer,
        decisions: RoutingDecisions,
        channels: Sequence[Channel],
        start_timeout: float = 60.0,
    ) -> None:
        self.config = config
        self.ingestor = ingestor
        self.decisions = decisions
        self.channels = list(channels)
        # A process started again takes the channels of the moment.
        self.child = Child(
            "router_process", _router_main, lambda path: (self.config, path, self.channels), self._serve,
            start_timeout,
        )  # fmt: skip
        self._ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[Any]] = {}
        # Appends received and not yet answered: a new process waits for them (its position).
        self._appends: set[asyncio.Task[None]] = set()
        self._signal = ingestor.commit_signal()
        self._theirs: set[int] = set()  # ids of the appendices from the process, being committed
        ingestor.on_commit(self._outbox_committed)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.child.listen()
        await self.child.spawn()
        self._read_outbox_again()
        self._tasks = [
            asyncio.create_task(self._notify_commits(), name="relais-router-notify"),
            asyncio.create_task(
                self.child.supervise(self._sent_committed, self._read_outbox_again), name="relais-router-supervise"
            ),
        ]

    def _read_outbox_again(self) -> None:
        """A process that just said hello read the open deliveries before it did: what was
        committed in between was sent to no one. It reads them again now."""
        link = self.child.link
        if link is not None:
            send(link, ("outbox", 0, None))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, request_id, body = await read_frame(reader)
                self.child.heard(writer)
                if kind == "append":
                    task = asyncio.create_task(self._append(writer, request_id, body))
                    self._appends.add(task)
                    task.add_done_callback(self._appends.discard)
                elif kind == "answer" and request_id == 0:
                    self.child.connected(writer, body[1])
                elif kind == "answer":
                    fut = self._answers.pop(request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _append(self, writer: asyncio.StreamWriter, request_id: int, body: list[Any]) -> None:
        """Commit each appendix of the frame on its own (one refused costs the others
        nothing) and answer them together."""
        appendices = [unpack_appendix(packed) for packed in body]
        self._theirs.update(id(a) for a in appendices)
        try:
            outcomes = await asyncio.gather(*(self.ingestor.append(a) for a in appendices), return_exceptions=True)
        finally:
            self._theirs.difference_update(id(a) for a in appendices)
        results: list[tuple[str, Any]] = []
        for appendix, outcome in zip(appendices, outcomes, strict=True):
            if outcome is None:
                results.append(("ok", None))
                self.decisions.committed(appendix)
            elif isinstance(outcome, IngestUnavailable):
                results.append(("unavailable", str(outcome)))
            elif isinstance(outcome, Exception):
                results.append(("unavailable", type(outcome).__name__))
            else:
                raise outcome  # cancelled: the engine is stopping
        send(writer, ("answer", request_id, results))

    def _outbox_committed(self, appendices: list[Appendix]) -> None:
        """The outbox's rows that this process committed on its own account (the study
        router's deliveries, say) go to the router process's delivery workers."""
        link = self.child.link
        if link is None or link.is_closing():
            return  # a process started later reads the open rows from the store
        if not appendices:  # commits went by unseen (the writer process): read them again
            send(link, ("outbox", 0, None))
            return
        statements = [
            (sql, rows)
            for appendix in appendices
            if id(appendix) not in self._theirs
            for sql, rows in appendix.statements
            if sql in _OUTBOX_STATEMENTS
        ]
        if statements:
            send(link, ("outbox", 0, statements))

    async def _notify_commits(self) -> None:
        """Tell the router process about every commit (new messages to route)."""
        while True:
            await self._signal.wait()
            self._signal.clear()
            link = self.child.link
            if link is not None and not link.is_closing():
                send(link, ("committed", 0, None))
            await asyncio.sleep(0.001)  # commits close together: one notice

    async def _sent_committed(self) -> None:
        """What the dead process sent is committed (or refused) before a new one reads
        its position: otherwise it would route those messages a second time."""
        if self._appends:
            await asyncio.wait(set(self._appends))

    async def reload(self, channels: Sequence[Channel]) -> list[str]:
        """Route with new channels from now on (and in a restarted process)."""
        self.channels = list(channels)
        link = self.child.link
        if link is None or link.is_closing():
            return [c.name for c in channels]  # a process being started takes self.channels
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = fut
        send(link, ("channels", request_id, self.channels))
        try:
            async with asyncio.timeout(30):
                status, names = await fut
        finally:
            self._answers.pop(request_id, None)
        if status != "ok":
            raise RuntimeError(f"the router process refused the channels: {names}")
        return list(names)

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        await self.child.end(terminate=True)  # SIGTERM: stop planning, close the store
        if self._appends:  # what it sent before it stopped is still committed
            await asyncio.wait(set(self._appends), timeout=30)
        self.child.close()
