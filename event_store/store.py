"""The append-only event store: events, their payloads, the hash chain and the message index.

Synchronous by design (eventsourcing and the database drivers are); the engine calls it
from one worker thread. One writer per store: the chain head is kept in memory.

    >>> store = EventStore.open("sqlite:///data/relais.db", Path("data/blobs"))
    >>> store.commit(batch)   # one transaction, payloads durable first
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import structlog
from eventsourcing.persistence import StoredEvent

from event_store.blobs import BlobStore, sha256_hex
from event_store.events import EVENT_TYPES, EncodedEvent, Event, PayloadRef, topic_of
from event_store.recorders import Recorder, SideRows, open_recorder
from event_store.writer_lock import WriterLock

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "Batch",
    "ChainReport",
    "EventStore",
    "MessageIndexRow",
    "RecordedEvent",
    "payload_ref",
]

log = structlog.get_logger("relais.store")

DEFAULT_INLINE_LIMIT = 256 * 1024
GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class MessageIndexRow:
    """One line of the searchable message index (derivable from the log)."""

    message_id: str
    received_at: str
    listener: str
    protocol: str
    peer: str
    sender: str
    control_id: str
    message_type: str
    trigger_event: str
    payload_sha256: str
    payload_inline: bool
    status: str  # accepted | rejected
    ack_code: str
    error_code: str = ""
    reason: str = ""
    location: str = ""


@dataclass
class Batch:
    """What one transaction writes: events in order, the payloads they name, index rows."""

    events: list[tuple[UUID, int, Event | EncodedEvent]] = field(default_factory=list)
    payloads: dict[str, tuple[PayloadRef, bytes]] = field(default_factory=dict)
    index: list[MessageIndexRow] = field(default_factory=list)
    statements: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)

    def add_payload(self, data: bytes, content_type: str, inline_limit: int) -> PayloadRef:
        ref = payload_ref(data, content_type, inline_limit)
        self.payloads.setdefault(ref.sha256, (ref, data))
        return ref


def payload_ref(data: bytes, content_type: str, inline_limit: int) -> PayloadRef:
    """How `data` will be stored: by its SHA-256, inline when small enough."""
    return PayloadRef(sha256_hex(data), len(data), content_type, inline=len(data) <= inline_limit)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    position: int
    originator_id: UUID
    version: int
    topic: str
    event: dict[str, Any]
    stream_prev: str
    log_prev: str
    hash: str


@dataclass
class ChainReport:
    events: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def event_hash(originator_id: UUID, version: int, topic: str, state: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{originator_id.hex}\n{version}\n{topic}\n".encode())
    h.update(state if isinstance(state, bytes | bytearray | memoryview) else str(state).encode())
    return h.hexdigest()


def _encode(event: Event | EncodedEvent, stream_prev: str, log_prev: str) -> bytes:
    if isinstance(event, EncodedEvent):  # the same bytes orjson writes for the whole object
        return b'{"stream_prev":"%s","log_prev":"%s","event":%s}' % (
            stream_prev.encode(),
            log_prev.encode(),
            event.body,
        )
    # orjson serialises (slotted) dataclasses natively, in field order: same bytes as asdict().
    return orjson.dumps({"stream_prev": stream_prev, "log_prev": log_prev, "event": event})


class EventStore:
    def __init__(
        self,
        recorder: Recorder,
        blobs: BlobStore,
        inline_limit: int,
        checkpoints: bool = True,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.recorder = recorder
        self.blobs = blobs
        self.inline_limit = inline_limit
        self._lock = threading.Lock()
        self._blob_writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-fsync")
        self._log_head = GENESIS
        # Heads of recently written streams (one writer per store, so they stay true).
        self._heads: dict[UUID, tuple[int, str]] = {}
        self._writer_lock: WriterLock | None = None
        self._closed = threading.Event()
        self._checkpoints = checkpoints
        self._checkpoint_interval = checkpoint_interval
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="wal-checkpoint", daemon=True)
        if checkpoints:
            self._checkpointer.start()
        last = self._last_notification()
        if last is not None:
            self._log_head = event_hash(last.originator_id, last.originator_version, last.topic, last.state)

    @classmethod
    def open(
        cls,
        url: str,
        blob_dir: Path,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        lock_timeout: float = 10.0,
        *,
        writer: bool = False,
        checkpoints: bool = True,
        checkpoint_interval: float = 1.0,
    ) -> EventStore:
        """Open a store; `writer=True` for the one process that appends (raises StoreBusy
        when another holds it), readers (the CLI) open it freely. `checkpoints=False`: a
        reader that lives beside the engine (the router process) leaves WAL checkpoints to
        the writer's process."""
        lock = WriterLock.acquire(url) if writer else None
        try:
            store = cls(
                open_recorder(url, lock_timeout), BlobStore(blob_dir), inline_limit, checkpoints, checkpoint_interval
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        store._writer_lock = lock
        return store

    def _checkpoint_loop(self) -> None:
        while not self._closed.wait(self._checkpoint_interval):
            try:
                self.recorder.checkpoint()
            except Exception as e:  # a busy database: try again next time
                log.warning("checkpoint_failed", error=type(e).__name__)

    def close(self) -> None:
        self._closed.set()
        if self._checkpoints:
            # Until its checkpoint is done: its connection is closed below. A checkpoint
            # waits for no one long (recorders.py: RESTART_WAIT_MS), its copy is bounded.
            self._checkpointer.join()
            try:
                self.recorder.checkpoint()
            except Exception as e:
                log.warning("checkpoint_failed", error=type(e).__name__)
        self._blob_writers.shutdown(wait=True)
        self.blobs.close()
        self.recorder.datastore.close()
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None

    @property
    def dialect(self) -> str:
        return self.recorder.dialect

    # -- writing -----------------------------------------------------------------------

    def stream_head(self, originator_id: UUID) -> tuple[int, str]:
        """(last version, its hash) of a stream; (0, GENESIS) when it has no event."""
        cached = self._heads.get(originator_id)
        if cached is not None:
            return cached
        rows = self.recorder.select_events(originator_id, desc=True, limit=1)
        if not rows:
            return 0, GENESIS
        s = rows[0]
        return s.originator_version, event_hash(originator_id, s.originator_version, s.topic, s.state)

    def commit(self, batch: Batch, *, after: Sequence[Future[Any]] = ()) -> list[int]:
        """Write the batch atomically; large payloads are fsynced before the transaction,
        and `after` (blob syncs, say) must have completed: both are awaited once the events
        are encoded, so that work overlaps the disk's.

        Returns the log positions of the events. On any error nothing of the batch is
        visible and the chain head is unchanged.
        """
        with self._lock:
            blob_jobs = [
                self._blob_writers.submit(self.blobs.put, ref.sha256, data)
                for ref, data in batch.payloads.values()
                if not ref.inline
            ]
            log_head = self._log_head
            heads: dict[UUID, tuple[int, str]] = {}
            stored: list[StoredEvent] = []
            for originator_id, version, event in batch.events:
                prev_version, stream_prev = heads.get(originator_id) or (
                    (0, GENESIS) if version == 1 else self.stream_head(originator_id)
                )
                if version != prev_version + 1:
                    raise ValueError(f"version {version} does not follow {prev_version} in {originator_id}")
                topic = topic_of(event)
                state = _encode(event, stream_prev, log_head)
                digest = event_hash(originator_id, version, topic, state)
                stored.append(StoredEvent(originator_id, version, topic, state))
                heads[originator_id] = (version, digest)
                log_head = digest
            for job in (*blob_jobs, *after):
                job.result()
            side = SideRows(
                payloads=[
                    (ref.sha256, ref.content_type, ref.size, data)
                    for ref, data in batch.payloads.values()
                    if ref.inline
                ],
                messages=[_index_tuple(row) for row in batch.index],
                statements=batch.statements,
            )
            positions = self.recorder.insert_events(stored, side=side) or []
            self._log_head = log_head
            if len(self._heads) > 100_000:
                self._heads.clear()
            self._heads.update(heads)
            return list(positions)

    # -- reading -----------------------------------------------------------------------

    def _last_notification(self) -> Any:
        top = self.recorder.max_notification_id()
        if not top:
            return None
        rows = self.recorder.select_notifications(start=top, limit=1)
        return rows[0] if rows else None

    def decode(self, notification: Any) -> RecordedEvent:
        """A notification (or stored event) of the recorder as a RecordedEvent."""
        return _decode(getattr(notification, "id", 0), notification)

    def events_of(self, originator_id: UUID) -> list[RecordedEvent]:
        out = []
        for s in self.recorder.select_events(originator_id):
            out.append(_decode(0, s))
        return out

    def read_log(self, start: int = 1, batch_size: int = 1000) -> Iterator[RecordedEvent]:
        """Every event in log order, from position `start`."""
        position = start
        while True:
            rows = self.recorder.select_notifications(start=position, limit=batch_size)
            if not rows:
                return
            for n in rows:
                yield _decode(n.id, n)
            position = rows[-1].id + 1

    def payload(self, sha256: str) -> bytes:
        """The raw bytes for a hash, checked against it."""
        rows = self.recorder.query("SELECT data FROM relais_payloads WHERE sha256 = ?", [sha256])
        data = bytes(rows[0]["data"]) if rows else self.blobs.get(sha256)
        if sha256_hex(data) != sha256:
            raise ValueError(f"payload {sha256} does not match its hash")
        return data

    def payloads(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """The raw bytes of several hashes, each checked against its hash: one query for
        the inline ones (a router batch), the blob folder for the others."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), 500):  # stay far below the bound-parameter limit
            chunk = wanted[start : start + 500]
            rows = self.query(
                f"SELECT sha256, data FROM relais_payloads WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update((r["sha256"], bytes(r["data"])) for r in rows)
        for sha256 in wanted:
            data = found.get(sha256)
            if data is None:
                found[sha256] = data = self.blobs.get(sha256)
            if sha256_hex(data) != sha256:
                raise ValueError(f"payload {sha256} does not match its hash")
        return found

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.recorder.query(sql, params)

    def execute(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> None:
        """One statement on Relais's own side tables (never the events: those go by commit)."""
        self.recorder.execute(sql, params)

    def find_messages(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Index rows of earlier messages for each (sender, control ID), oldest first.

        One query per sender (the usual batch has one or a few), using the (sender,
        control_id) index.
        """
        by_sender: dict[str, set[str]] = {}
        for sender, control_id in keys:
            by_sender.setdefault(sender, set()).add(control_id)
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for sender, control_ids in by_sender.items():
            ids = sorted(control_ids)
            for start in range(0, len(ids), 500):  # stay far below the bound-parameter limit
                chunk = ids[start : start + 500]
                rows = self.query(
                    "SELECT * FROM relais_messages WHERE sender = ? AND control_id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY received_at",
                    [sender, *chunk],
                )
                for row in rows:
                    found.setdefault((sender, row["control_id"]), []).append(row)
        return found

    def verify_chain(self) -> ChainReport:
        """Walk the whole log and check every stream and log link."""
        report = ChainReport()
        stream_heads: dict[UUID, str] = {}
        log_head = GENESIS
        for rec in self.read_log():
            report.events += 1
            if rec.log_prev != log_head:
                report.problems.append(f"position {rec.position}: log link broken")
            expected_stream = stream_heads.get(rec.originator_id, GENESIS)
            if rec.stream_prev != expected_stream:
                report.problems.append(f"position {rec.position}: stream link broken for {rec.originator_id}")
            stream_heads[rec.originator_id] = rec.hash
            log_head = rec.hash
        report.head = log_head
        return report


def _index_tuple(row: MessageIndexRow) -> tuple[Any, ...]:
    return (
        row.message_id, row.received_at, row.listener, row.protocol, row.peer, row.sender,
        row.control_id, row.message_type, row.trigger_event, row.payload_sha256,
        int(row.payload_inline), row.status, row.ack_code, row.error_code, row.reason,
        row.location,
    )  # fmt: skip


def _decode(position: int, s: Any) -> RecordedEvent:
    body = orjson.loads(s.state)
    oid = s.originator_id if isinstance(s.originator_id, UUID) else UUID(str(s.originator_id))
    if s.topic not in EVENT_TYPES:
        raise ValueError(f"unknown event topic {s.topic!r} at {oid}/{s.originator_version}")
    return RecordedEvent(
        position=position,
        originator_id=oid,
        version=s.originator_version,
        topic=s.topic,
        event=body["event"],
        stream_prev=body["stream_prev"],
        log_prev=body["log_prev"],
        hash=event_hash(oid, s.originator_version, s.topic, s.state),
    )
