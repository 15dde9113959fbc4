"""Group commit: every submission waits here until its events are durable.

One writer task drains the queue, turns the submissions into events (recognising
resends), commits them in one transaction on a worker thread and only then completes
each waiting caller with its `Receipt`. Nothing is acknowledged before that.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from engine.tasks import in_thread
from event_store import (
    Batch,
    DuplicateReceived,
    EncodedEvent,
    Event,
    EventStore,
    MessageIndexRow,
    MessageReceived,
    MessageRejected,
    PayloadRef,
)

__all__ = [
    "Appender", "Appendix", "IngestUnavailable", "Ingestor", "Receipt", "Submission", "Submitter", "Verdict", "Writer",
]  # fmt: skip

log = structlog.get_logger("relais.ingest")


class IngestUnavailable(Exception):
    """The store could not commit: the caller must answer 'not stored, resend'."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the edge decided: accepted, or refused with a protocol code and a reason."""

    status: str = "accepted"  # accepted | error | reject
    ack_code: str = "AA"
    error_code: str = ""
    reason: str = ""
    location: str = ""


ACCEPTED = Verdict()


@dataclass(slots=True)
class Submission:
    """A message as the edge read it: raw bytes, peer, metadata and the edge's verdict."""

    listener: str
    protocol: str
    peer: str
    payload: bytes
    content_type: str
    sender: str = ""
    control_id: str = ""
    message_type: str = ""
    trigger_event: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict = ACCEPTED
    # The protocol's own facts about the new message (InstanceReceived, MailReceived,
    # DocumentSubmitted...), appended to its stream after MessageReceived, same commit.
    events: list[Event] = field(default_factory=list)
    # Set when the edge already put the bytes in the blob store (a spooled DICOM file, say):
    # `payload` is then empty and nothing is written again.
    stored_payload: PayloadRef | None = None
    # The edge only placed the blob (`BlobStore.place`): the commit waits for its sync.
    blob_synced: Future[None] | None = None
    # Further content the new message names in its events (a REST submission's documents),
    # stored by hash in the same commit.
    payloads: list[tuple[PayloadRef, bytes]] = field(default_factory=list)
    # When set, a control ID this sender already used for other content refuses the
    # submission with this verdict (REST Idempotency-Key) instead of accepting it flagged.
    reused_key_verdict: Verdict | None = None


@dataclass(slots=True)
class Appendix:
    """Events about messages already in the log (routing, deliveries), the payloads they
    name and the rows kept in step with them (outbox, tracking), committed together."""

    # EncodedEvent: encoded by the process that derived it (engine/router_process.py).
    events: list[tuple[uuid.UUID, Event | EncodedEvent]] = field(default_factory=list)
    payloads: list[tuple[PayloadRef, bytes]] = field(default_factory=list)
    statements: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The durable outcome of one submission (for a resend: the original's)."""

    message_id: uuid.UUID
    received_at: str
    verdict: Verdict
    duplicate: bool = False
    flags: tuple[str, ...] = ()


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): new messages append to the store's indexes
    instead of landing on random pages, which halves the pages a commit writes."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


_Item = tuple[Submission | Appendix, asyncio.Future[Any]]


class Appender(Protocol):
    """What a follower of the log needs: the local Ingestor, or the router process's link
    to the writer (engine/router_process.py). `on_commit` watchers see the appendices of
    every commit; through the link, its own and the outbox's statements of the others."""

    async def append(self, appendix: Appendix) -> None: ...

    def commit_signal(self) -> asyncio.Event: ...

    def on_commit(self, watcher: Callable[[list[Appendix]], None]) -> None: ...


class Submitter(Protocol):
    """What an intake needs: the local Ingestor, or an acceptor's link to the writer."""

    async def submit(self, submission: Submission) -> Receipt: ...


class Writer(Appender, Submitter, Protocol):
    """The single writer as the engine's components use it: the Ingestor in this process,
    or the link to the writer process (engine/writer_process.py)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Ingestor:
    def __init__(
        self,
        store: EventStore,
        *,
        batch_window_ms: float = 0.0,
        max_batch: int = 256,
        max_pending: int = 10000,
        on_loop: bool = False,
    ) -> None:
        self.store = store
        # Commit on the event loop itself, not a worker thread. A commit is a few dozen
        # SQLite calls; on a thread, each gives up the GIL and must win it back from the busy
        # loop, which made a commit of 32 items take 7 ms of which the disk's sync was 0.2
        # (bench/RESULTS.md §21). The loop then waits for the commit instead.
        self.on_loop = on_loop
        self.window = batch_window_ms / 1000.0
        self.max_batch = max_batch
        # None is the stop sentinel: everything queued before it is committed first.
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=max_pending)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._signals: list[asyncio.Event] = []
        self._watchers: list[Callable[[list[Appendix]], None]] = []
        self.committed = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relais-ingest-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self._task is None:
            return
        self._stopping = True
        await self._queue.put(None)
        await self._task
        self._task = None

    async def submit(self, submission: Submission) -> Receipt:
        """Wait until the submission is durable; raises IngestUnavailable if it is not."""
        if self._task is None or self._task.done() or self._stopping:
            raise IngestUnavailable("ingest writer is not running")
        fut: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        await self._queue.put((submission, fut))
        return await fut

    async def append(self, appendix: Appendix) -> None:
        """Commit events about existing messages through the same single writer."""
        if self._task is None or self._task.done() or self._stopping:
            raise IngestUnavailable("ingest writer is not running")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((appendix, fut))
        await fut

    def commit_signal(self) -> asyncio.Event:
        """An event set after every commit, for followers of the log (the router)."""
        signal = asyncio.Event()
        self._signals.append(signal)
        return signal

    def on_commit(self, watcher: Callable[[list[Appendix]], None]) -> None:
        """Call `watcher` with the appendices of every commit, once durable, on the event
        loop, before any caller is answered (the delivery workers' outbox index)."""
        self._watchers.append(watcher)

    async def _run(self) -> None:
        queue = self._queue
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                return
            items = [first]
            if self.window:
                await asyncio.sleep(self.window)
            elif self.on_loop:
                # Let what is ready run first (reads that end in a submit, attempts that end
                # in an outcome): committed together, not one commit each.
                await asyncio.sleep(0)
            while len(items) < self.max_batch:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    stopping = True
                    break
                items.append(item)
            await self._commit_and_answer(items)

    async def _commit_and_answer(self, items: list[_Item]) -> None:
        try:
            batch = [s for s, _ in items]
            receipts = self._commit(batch) if self.on_loop else await in_thread(self._commit, batch)
        except Exception as e:
            messages = [i for i in items if isinstance(i[0], Submission)]
            followers = [i for i in items if isinstance(i[0], Appendix)]
            if messages and followers:
                # A bad routing/delivery record must not cost hospitals their ACKs (nor the
                # reverse): commit the two kinds apart and answer each by its own outcome.
                log.warning("mixed_batch_failed_retrying_apart", size=len(items), error=type(e).__name__)
                await self._commit_and_answer(messages)
                await self._commit_and_answer(followers)
                return
            log.error("batch_commit_failed", size=len(items), error=type(e).__name__, detail=str(e)[:200])
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(IngestUnavailable(type(e).__name__))
            return
        self.committed += len(items)
        appendices = [s for s, _ in items if isinstance(s, Appendix)]
        for watcher in self._watchers if appendices else ():
            try:
                watcher(appendices)
            except Exception as e:  # a watcher's bug must not cost the callers their answers
                log.error("commit_watcher_failed", error=type(e).__name__, detail=str(e)[:200])
        for (_, fut), receipt in zip(items, receipts, strict=True):
            if not fut.done():  # the caller may have gone (connection closed)
                fut.set_result(receipt)
        for signal in self._signals:
            signal.set()

    # -- on the writer thread ----------------------------------------------------------

    def _commit(self, items: list[Submission | Appendix]) -> list[Receipt | None]:
        store = self.store
        batch = Batch()
        receipts: list[Receipt | None] = []
        seen = store.find_messages(
            (s.sender, s.control_id) for s in items if isinstance(s, Submission) and s.control_id
        )
        next_version: dict[uuid.UUID, int] = {}
        for sub in items:
            if isinstance(sub, Appendix):
                for oid, event in sub.events:
                    version = next_version.get(oid) or store.stream_head(oid)[0] + 1
                    next_version[oid] = version + 1
                    batch.events.append((oid, version, event))
                for ref, data in sub.payloads:
                    batch.payloads.setdefault(ref.sha256, (ref, data))
                for sql, rows in sub.statements:
                    # The delivery outcomes of a batch each update the outbox: one statement
                    # for all of them (the order of the statements is kept).
                    if batch.statements and batch.statements[-1][0] == sql:
                        batch.statements[-1] = (sql, [*batch.statements[-1][1], *rows])
                    else:
                        batch.statements.append((sql, list(rows)))
                receipts.append(None)
                continue
            now = _now()
            if sub.stored_payload is not None:
                ref = sub.stored_payload
            else:
                ref = batch.add_payload(sub.payload, sub.content_type, store.inline_limit)
            for extra_ref, data in sub.payloads:
                batch.payloads.setdefault(extra_ref.sha256, (extra_ref, data))
            flags: list[str] = []
            if sub.control_id:
                key = (sub.sender, sub.control_id)
                earlier = seen.setdefault(key, [])
                original = next((r for r in earlier if r["payload_sha256"] == ref.sha256), None)
                if original is not None:
                    oid = uuid.UUID(original["message_id"])
                    version = next_version.get(oid) or store.stream_head(oid)[0] + 1
                    next_version[oid] = version + 1
                    batch.events.append((oid, version, DuplicateReceived(now, sub.listener, sub.peer)))
                    receipts.append(
                        Receipt(
                            oid,
                            original["received_at"],
                            Verdict(
                                original["status"], original["ack_code"], original["error_code"],
                                original["reason"], original["location"],
                            ),
                            duplicate=True,
                        )
                    )  # fmt: skip
                    continue
                if earlier:
                    flags.append("control_id_reused")
            message_id = uuid7()
            refused = sub.reused_key_verdict if "control_id_reused" in flags else None
            verdict = refused or sub.verdict
            batch.events.append(
                (
                    message_id,
                    1,
                    MessageReceived(now, sub.listener, sub.protocol, sub.peer, ref, sub.metadata, flags),
                )
            )
            if verdict.status != "accepted":
                batch.events.append(
                    (
                        message_id,
                        2,
                        MessageRejected(now, verdict.ack_code, verdict.error_code, verdict.reason, verdict.location),
                    )
                )
            version = 3 if verdict.status != "accepted" else 2
            for extra in sub.events if refused is None else ():
                batch.events.append((message_id, version, extra))
                version += 1
            row = MessageIndexRow(
                message_id=str(message_id),
                received_at=now,
                listener=sub.listener,
                protocol=sub.protocol,
                peer=sub.peer,
                sender=sub.sender,
                control_id=sub.control_id,
                message_type=sub.message_type,
                trigger_event=sub.trigger_event,
                payload_sha256=ref.sha256,
                payload_inline=ref.inline,
                status=verdict.status,
                ack_code=verdict.ack_code,
                error_code=verdict.error_code,
                reason=verdict.reason,
                location=verdict.location,
            )
            batch.index.append(row)
            next_version[message_id] = version
            if sub.control_id:
                seen[(sub.sender, sub.control_id)].append(
                    {
                        "message_id": str(message_id), "received_at": now,
                        "payload_sha256": ref.sha256, "status": verdict.status,
                        "ack_code": verdict.ack_code, "error_code": verdict.error_code,
                        "reason": verdict.reason, "location": verdict.location,
                    }
                )  # fmt: skip
            receipts.append(Receipt(message_id, now, verdict, flags=tuple(flags)))
        # never commit an event before the blob it names is durable
        store.commit(batch, after=[s.blob_synced for s in items if isinstance(s, Submission) and s.blob_synced])
        return receipts
