"""Delivery workers: take due deliveries from the outbox, in order per key, and record
every attempt and outcome as events (retry with backoff and jitter, then dead letter).

A delivery is durable before it is attempted (the router wrote it); `DeliveryAttempted`
is committed with the attempt's outcome, in one commit: a crash in between leaves the
delivery pending, so it is attempted again (at least once: the same bytes, and for HTTP the
same Idempotency-Key). A destination that is down only holds its own keys.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from connectors.destination import (
    Delivery,
    DeliveryOutcome,
    PermanentFailure,
    TemporaryFailure,
    max_in_flight,
)  # fmt: skip
from engine.ingest import Appender, Appendix
from engine.outbox import OPEN_ROWS, OUTBOX_REOPEN, OUTBOX_UPDATE, OutboxIndex
from engine.routes import DestinationSpec
from engine.targets import Target, close_targets
from engine.tasks import cancel_and_wait, in_thread
from event_store import Event, EventStore
from event_store.events import DeadLettered, Delivered, DeliveryAttempted, DeliveryFailed, Redelivered

__all__ = ["DELIVERY_ROWS", "DeliveryWorkers", "backoff_delay"]

log = structlog.get_logger("relais.delivery")

# What an attempt needs of the deliveries it starts, read once for all of them. Which ones
# are due comes from the outbox index (engine/outbox.py), not from a scan of the outbox.
# Only rows still pending are attempted; that test is made on the rows read (`_rows`), not
# in SQL: with `state = 'pending'` here, SQLite (no ANALYZE statistics) read the rows through
# the state index, i.e. every pending delivery, a read that grew with the backlog.
DELIVERY_ROWS = """
SELECT o.*, p.data AS inline_payload, m.control_id, m.message_type, m.trigger_event, m.sender,
       dd.details AS delivery_details
FROM relais_outbox o
LEFT JOIN relais_payloads p ON p.sha256 = o.payload_sha256
LEFT JOIN relais_delivery_details dd ON dd.delivery_id = o.delivery_id
LEFT JOIN relais_messages m ON m.message_id = o.message_id
WHERE o.delivery_id IN ({})
"""


def backoff_delay(attempt: int, spec: DestinationSpec, rng: random.Random | None = None) -> float:
    """Seconds before attempt `attempt + 1`: exponential, capped, with ±20 % jitter."""
    base = min(spec.backoff_max, spec.backoff_initial * (2 ** (attempt - 1)))
    return base * (0.8 + 0.4 * (rng or random).random())


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds")


class DeliveryWorkers:
    def __init__(
        self,
        store: EventStore,
        ingestor: Appender,
        targets: Mapping[tuple[str, str], Target],
        concurrency: int = 32,
    ) -> None:
        self.store = store
        self.ingestor = ingestor
        self.targets = dict(targets)
        self._in_flight: set[str] = set()
        # Of those, the attempts done with their destination whose outcome waits for its
        # commit: they hold no slot, only their key (bench/RESULTS.md §27).
        self._recording = 0
        self._busy_keys: set[tuple[str, str, str]] = set()
        self._outbox = OutboxIndex()
        self._resync = False
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        # Each destination has at most its own `max_in_flight` of the slots, and at most a
        # quarter of the room in attempts speaking to it or waiting to (`_cap`): a slow or
        # silent partner holds neither the slots nor the room that the others need.
        self._gates: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._started: dict[tuple[str, str], int] = {}
        self._breakers: dict[tuple[str, str], _Breaker] = {}
        self._wake = ingestor.commit_signal()
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()

    async def reload(self, targets: Mapping[tuple[str, str], Target]) -> None:
        """Deliver to `targets` from now on; the old destinations are closed."""
        old, self.targets = self.targets, dict(targets)
        self._gates.clear()  # attempts under way release the gates they took
        self._breakers.clear()  # a changed destination is tried again at once
        self._outbox.requeue_all()  # keys whose channel had gone may have one again
        await close_targets(old)

    async def start(self) -> None:
        # Watch the commits before reading the open rows: none is missed in between (the
        # index adds a row once, however often it sees it).
        self.ingestor.on_commit(self._committed)
        self._outbox.load(await in_thread(self.store.query, OPEN_ROWS))
        log.info("outbox_loaded", open_deliveries=len(self._outbox))
        self._task = asyncio.create_task(self._run(), name="relais-delivery")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._attempts:
            await asyncio.wait(self._attempts, timeout=10)
        await close_targets(self.targets)

    def _committed(self, appendices: list[Appendix]) -> None:
        if not appendices:  # commits may have gone unseen (engine/writer_process.py)
            self._resync = True
            self._wake.set()
        for appendix in appendices:
            if appendix.statements:
                self._outbox.committed(appendix.statements)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        requests_read = 0.0
        while True:
            # Operators' requests are rare: a look every quarter second, not at every commit.
            if loop.time() - requests_read >= 0.25:
                requests_read = loop.time()
                try:
                    await self._carry_out_requests()
                except Exception as e:
                    log.error("requests_failed", error=type(e).__name__, detail=str(e)[:200])
            started = 0
            self._probe_due(loop.time())
            try:
                if self._resync:
                    self._resync = False
                    self._outbox.load(await in_thread(self.store.query, OPEN_ROWS))
                if self._outbox.unknown:
                    await self._read_again(list(self._outbox.unknown))
                started = await self._start_due()
            except Exception as e:
                log.error("outbox_unreadable", error=type(e).__name__, detail=str(e)[:200])
            # Wake on the next commit (new routes, finished attempts) or after a while for
            # retries that come due. A pass that started attempts costs a read of their rows:
            # the next one waits a millisecond, for more to start together.
            self._wake.clear()
            try:
                async with asyncio.timeout(0.25):
                    await self._wake.wait()
            except TimeoutError:
                pass
            await asyncio.sleep(0.001 if started else 0)

    async def _read_again(self, ids: list[str]) -> None:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):  # far below the bound-parameter limit
            chunk = ids[start : start + 500]
            rows += await in_thread(
                self.store.query, f"{OPEN_ROWS} AND delivery_id IN ({','.join('?' * len(chunk))})", chunk
            )
        self._outbox.reloaded(ids, rows)

    async def _start_due(self) -> int:
        """Start the attempts of the due heads, as many as there is room for."""
        # Up to four attempts per slot speaking or waiting for one (with their rows read, so
        # a slot freed is used at once, not at the next pass). The attempts whose outcome
        # waits for its commit do not count, up to sixteen per slot in all: a commit's round
        # trip (tens of ms under load) must not hold back the next attempts.
        speaking = len(self._in_flight) - self._recording
        room = min(4 * self._concurrency - speaking, 16 * self._concurrency - len(self._in_flight))
        if room <= 0:
            return 0
        ids: list[str] = []
        back: list[str] = []
        taking: dict[tuple[str, str], int] = {}
        loop_time = asyncio.get_running_loop().time()
        for delivery_id in self._outbox.take(_iso(datetime.now(UTC)), room):
            key = self._outbox.key_of(delivery_id)
            target = self.targets.get((key[0], key[1])) if key else None
            if key is None or target is None:
                continue  # channel or destination no longer configured: it waits (reload)
            if key in self._busy_keys:
                back.append(delivery_id)  # an older delivery of its key is in flight
                continue
            tk = (key[0], key[1])
            if self._started.get(tk, 0) + taking.get(tk, 0) >= self._cap(target):
                self._outbox.park(delivery_id, tk)  # until one of its attempts ends
                continue
            breaker = self._breakers.get(tk)
            if breaker is not None and not breaker.probe(loop_time, delivery_id):
                self._outbox.park(delivery_id, tk)  # suspended: until its probe is due or answered
                continue
            taking[tk] = taking.get(tk, 0) + 1
            ids.append(delivery_id)
        for delivery_id in back:
            self._outbox.give_back(delivery_id)
        if not ids:
            return 0
        rows = {r["delivery_id"]: r for r in await in_thread(self._rows, ids)}
        started = 0
        for delivery_id in ids:
            row = rows.get(delivery_id)
            key = self._outbox.key_of(delivery_id)
            target = self.targets.get((key[0], key[1])) if key else None
            if row is None or key is None or target is None:
                # Not pending in the store: the index is wrong about it, read it again.
                log.warning("outbox_row_not_pending", delivery_id=delivery_id)
                self._outbox.doubt(delivery_id)
                breaker = self._breakers.get((key[0], key[1])) if key is not None else None
                if breaker is not None and breaker.probing == delivery_id:
                    breaker.probing = ""  # the next head is the probe
                continue
            self._in_flight.add(delivery_id)
            self._busy_keys.add(key)
            self._started[(key[0], key[1])] = self._started.get((key[0], key[1]), 0) + 1
            task = asyncio.create_task(self._attempt(row, target, key))
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)
            started += 1
        for tk in taking:  # planned and not started (rows not pending): what waited for them goes
            target = self.targets.get(tk)
            free = self._cap(target) - self._started.get(tk, 0) if target else 0
            if free > 0:
                self._outbox.unpark(tk, free)
        return started

    async def _speak(
        self, row: dict[str, Any], target: Target, key: tuple[str, str, str], attempt: int
    ) -> tuple[DeliveryAttempted, DeliveryOutcome | None, str, str]:
        """Hand the delivery to its destination: (the attempt, the outcome or None, why it is
        dead-lettered now, the error to retry on)."""
        try:
            # A slot is held while the destination is spoken to, not while the outcome
            # waits for its commit: the key stays busy until then, which keeps the order.
            # The destination's gate first: waiting for it holds no slot.
            async with self._gate(key[0], key[1], target), self._slots:
                # The attempt is recorded with its outcome, in one commit: a crash in between
                # leaves the delivery pending, so it is attempted again (at least once).
                attempted = DeliveryAttempted(_iso(datetime.now(UTC)), row["delivery_id"], attempt)
                # Small payloads come with the outbox row; large ones are read from the blob folder.
                inline = row["inline_payload"]
                payload = (
                    bytes(inline) if inline is not None else await in_thread(self.store.payload, row["payload_sha256"])
                )
                delivery = Delivery(row["delivery_id"], row["message_id"], row["channel"], row["destination"],
                                    payload, row["content_type"], _metadata(row), attempt)  # fmt: skip
                try:
                    return attempted, await target.destination.deliver(delivery), "", ""
                except PermanentFailure as e:
                    return attempted, None, f"permanent: {e}", ""
                except (TemporaryFailure, OSError, TimeoutError) as e:
                    return attempted, None, "", str(e) or type(e).__name__
                except Exception as e:  # a connector bug must not lose the delivery
                    return attempted, None, "", type(e).__name__
        finally:  # done with the destination: it may take another of its deliveries
            self._spoken((key[0], key[1]))

    def _spoken(self, tk: tuple[str, str]) -> None:
        """An attempt is done with its destination (its outcome may still wait for its commit)."""
        self._started[tk] -= 1
        if not self._started[tk]:
            del self._started[tk]
        self._outbox.unpark(tk, 1)

    def _answered(self, tk: tuple[str, str], spec: DestinationSpec, delivery_id: str, failed: bool, error: str) -> None:
        """Count an attempt's outcome against its destination: `suspend_after` temporary
        failures in a row (whatever the keys) suspend it; any answer resumes it."""
        breaker = self._breakers.get(tk)
        if not failed:
            if breaker is not None:
                del self._breakers[tk]
                if breaker.suspended:
                    log.info("destination_resumed", channel=tk[0], destination=tk[1], failures=breaker.failures)
                    self._outbox.unpark(tk, 1_000_000_000)  # every head it held back
            return
        if not spec.suspend_after:
            return
        if breaker is None:
            breaker = self._breakers[tk] = _Breaker()
        if breaker.failed(asyncio.get_running_loop().time(), spec, delivery_id):
            log.warning("destination_suspended", channel=tk[0], destination=tk[1], failures=breaker.failures,
                        error=error[:120])  # fmt: skip

    def _probe_due(self, now: float) -> None:
        """A suspended destination whose probe is due gets one of its parked heads back."""
        for tk, breaker in self._breakers.items():
            if breaker.suspended and not breaker.probing and breaker.retry_at <= now:
                self._outbox.unpark(tk, 1)

    def _cap(self, target: Target) -> int:
        """Attempts of one destination started and not done speaking to it: enough waiting
        with their rows read to keep its connections busy, a quarter of the room at most
        (unless it takes more at once)."""
        return max(2 * max_in_flight(target.destination), self._concurrency)

    def _gate(self, channel: str, destination: str, target: Target) -> asyncio.Semaphore:
        gate = self._gates.get((channel, destination))
        if gate is None:
            gate = self._gates[(channel, destination)] = asyncio.Semaphore(max_in_flight(target.destination))
        return gate

    def _rows(self, ids: list[str]) -> list[dict[str, Any]]:
        """On a worker thread: what the attempts of these pending deliveries need (payload,
        message metadata)."""
        rows = self.store.query(DELIVERY_ROWS.format(",".join("?" * len(ids))), ids)
        return [r for r in rows if r["state"] == "pending"]

    async def _attempt(self, row: dict[str, Any], target: Target, key: tuple[str, str, str]) -> None:
        delivery_id = row["delivery_id"]
        message_id = uuid.UUID(row["message_id"])
        attempt = int(row["attempts"]) + 1
        spec = target.spec
        recording = False
        try:
            attempted, outcome, dead, error = await self._speak(row, target, key, attempt)
            recording = True
            self._recording += 1
            self._answered((key[0], key[1]), spec, delivery_id, outcome is None and not dead, error)
            if dead:
                await self._dead(attempted, message_id, dead, spec)
            elif outcome is None:
                await self._failed(attempted, message_id, error, spec)
            else:
                done = _iso(datetime.now(UTC))
                delivered = Delivered(done, delivery_id, attempt, outcome.detail[:200])
                await self._record(message_id, attempted, delivered, "delivered", done, "", False)
                # What the partner answered is in the event (`detail`), not here: a file's name
                # may be a document's own, which can name the patient.
                log.info("delivered", delivery_id=delivery_id, destination=row["destination"], attempt=attempt)
        except Exception as e:  # the store refused the record: the outbox row stays pending
            log.error("delivery_not_recorded", delivery_id=delivery_id, error=type(e).__name__)
            await asyncio.sleep(1.0)  # do not hammer a store that refuses writes
        finally:
            if recording:
                self._recording -= 1
            self._in_flight.discard(delivery_id)
            self._busy_keys.discard(key)
            # Recorded: the index has its outcome already. Not recorded: due again.
            self._outbox.give_back(delivery_id)
            self._wake.set()

    async def _record(
        self,
        message_id: uuid.UUID,
        attempted: DeliveryAttempted,
        outcome: Event,
        state: str,
        next_attempt_at: str,
        error: str,
        blocks: bool,
    ) -> None:
        """The attempt, its outcome and the outbox row, in one commit."""
        now = _iso(datetime.now(UTC))
        row = (state, attempted.attempt, next_attempt_at, error, int(blocks), now, attempted.delivery_id)
        await self.ingestor.append(
            Appendix(events=[(message_id, attempted), (message_id, outcome)], statements=[(OUTBOX_UPDATE, [row])])
        )

    async def _failed(
        self, attempted: DeliveryAttempted, message_id: uuid.UUID, error: str, spec: DestinationSpec
    ) -> None:
        delivery_id, attempt = attempted.delivery_id, attempted.attempt
        if attempt >= spec.max_attempts:
            await self._dead(attempted, message_id, f"gave up after {attempt} attempts: {error}", spec)
            return
        now = datetime.now(UTC)
        retry_at = _iso(now + timedelta(seconds=backoff_delay(attempt, spec)))
        failed = DeliveryFailed(_iso(now), delivery_id, attempt, error[:300], retry_at)
        await self._record(message_id, attempted, failed, "pending", retry_at, error[:300], False)
        log.warning("delivery_failed", delivery_id=delivery_id, attempt=attempt, retry_at=retry_at, error=error[:120])

    async def _dead(
        self, attempted: DeliveryAttempted, message_id: uuid.UUID, error: str, spec: DestinationSpec
    ) -> None:
        delivery_id, attempt = attempted.delivery_id, attempted.attempt
        now = _iso(datetime.now(UTC))
        blocks = spec.on_failure == "block"
        dead = DeadLettered(now, delivery_id, attempt, error[:300], blocks)
        await self._record(message_id, attempted, dead, "dead", now, error[:300], blocks)
        log.error("dead_lettered", delivery_id=delivery_id, attempt=attempt, blocks=blocks, error=error[:120])

    async def _carry_out_requests(self) -> None:
        """Operators' redeliver requests (queued by `relais redeliver`), each a recorded event."""
        pending = await in_thread(
            self.store.query, "SELECT * FROM relais_requests WHERE done_at IS NULL ORDER BY created_at"
        )
        for request in pending:
            args = json.loads(request["args"])
            if "message_id" in args:
                rows = await in_thread(
                    self.store.query,
                    "SELECT delivery_id, message_id FROM relais_outbox WHERE message_id = ? AND state <> 'pending'",
                    [args["message_id"]],
                )
            else:
                rows = await in_thread(
                    self.store.query,
                    "SELECT delivery_id, message_id FROM relais_outbox "
                    "WHERE channel = ? AND created_at >= ? AND state <> 'pending' ORDER BY seq",
                    [args["channel"], args["since"]],
                )
            now = _iso(datetime.now(UTC))
            appendix = Appendix(
                events=[
                    (
                        uuid.UUID(r["message_id"]),
                        Redelivered(now, r["delivery_id"], request["requested_by"], request["reason"]),
                    )
                    for r in rows
                ],
                statements=[
                    (OUTBOX_REOPEN, [(now, now, r["delivery_id"]) for r in rows]),
                    (
                        "UPDATE relais_requests SET done_at = ?, result = ? WHERE request_id = ?",
                        [(now, f"{len(rows)} deliveries queued again", request["request_id"])],
                    ),
                ],
            )
            await self.ingestor.append(appendix)
            log.info("redelivery_requested", request_id=request["request_id"], deliveries=len(rows),
                     requested_by=request["requested_by"])  # fmt: skip


@dataclass
class _Breaker:
    """A destination's failed attempts in a row, and once suspended, its probes.

    Suspended, a destination gets one attempt at a time (a probe: the head that comes next,
    counted as that delivery's attempt), spaced like one key's retries; its other heads wait
    out of the queues, attempted by no one and recording nothing. A partner down for an hour
    then costs a probe every `backoff_max`, not an attempt and a failure event per key, and
    its keys keep their attempts for when it is back."""

    failures: int = 0
    probes: int = 0  # probes that failed since the suspension
    suspended: bool = False
    probing: str = ""  # the delivery attempted as the probe, while it is
    retry_at: float = 0.0

    def failed(self, now: float, spec: DestinationSpec, delivery_id: str) -> bool:
        """One more failure; True when this one suspends the destination."""
        self.failures += 1
        if self.probing == delivery_id:
            self.probing = ""
            self.probes += 1
        if self.failures < spec.suspend_after:
            return False
        newly = not self.suspended
        self.suspended = True
        self.retry_at = now + backoff_delay(self.probes + 1, spec)
        return newly

    def probe(self, now: float, delivery_id: str) -> bool:
        """May this head be attempted now? Not suspended: yes. Suspended: one probe when due."""
        if not self.suspended:
            return True
        if self.probing or now < self.retry_at:
            return False
        self.probing = delivery_id
        return True


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """What a destination may use to name or route what it sends (never patient data)."""
    app, _, fac = (row.get("sender") or "").partition("|")
    meta: dict[str, Any] = {
        "control_id": row.get("control_id") or "",
        "message_type": row.get("message_type") or "",
        "trigger_event": row.get("trigger_event") or "",
        "sending_application": app,
        "sending_facility": fac,
    }
    if row.get("delivery_details"):  # a document's filename and content type (engine/route_items.py)
        meta.update(json.loads(row["delivery_details"]))
    return meta
