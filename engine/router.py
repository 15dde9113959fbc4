"""The router: follows the log from its tracked position and plans deliveries.

For each accepted message it records `MessageRouted` (channels, deliveries with their
transformed payload) or `NotRouted` (why, per channel), fills the outbox and moves its
position, all in one transaction: exactly once, across restarts. HL7 messages go through
`plan_routes`; mails and REST submissions as items (themselves and their documents, see
engine/route_items.py); DICOM instances wait for their study (engine/study_router.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from engine.follower import LogFollower
from engine.ingest import Appender, Appendix, uuid7
from engine.outbox import OUTBOX_INSERT
from engine.route_items import SUBMISSION_PROTOCOLS, items_of, route_items
from engine.routes import Channel, RouteInput, ordering_key, parse_for_routing
from engine.tasks import in_thread
from event_store import EventStore
from event_store.events import EncodedEvent, MessageRouted, NotRouted, PlannedDelivery
from event_store.store import payload_ref

__all__ = ["DETAILS_INSERT", "Plan", "Router", "RoutingDecisions", "plan_message", "plan_routes"]

log = structlog.get_logger("relais.router")

DETAILS_INSERT = "INSERT INTO relais_delivery_details VALUES (?,?)"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class Plan:
    """What routing one message decided (also what a dry-run prints)."""

    message_id: uuid.UUID
    position: int
    routed: MessageRouted | NotRouted
    payloads: list[tuple[Any, bytes]]


def plan_routes(
    channels: Sequence[Channel],
    message_id: uuid.UUID,
    position: int,
    received: dict[str, Any],
    raw: bytes,
    inline_limit: int,
) -> Plan:
    """Run one stored message through the channels (pure: nothing is written)."""
    now = _now()
    metadata = received.get("metadata", {})
    message = parse_for_routing(raw, metadata)
    if message is None:
        return Plan(message_id, position, NotRouted(now, "message is not readable HL7", {}, position), [])
    item = RouteInput(message, metadata, received.get("listener", ""), "hl7")
    encoding = metadata.get("decoded_as") or "utf-8"
    matched, deliveries, payloads, misses = [], [], [], {}
    for channel in channels:
        result = channel.route(item, encoding)
        if not result.matched:
            misses[channel.name] = result.reason
            continue
        matched.append(channel.name)
        ref = payload_ref(result.payload, "application/hl7-v2", inline_limit)
        payloads.append((ref, result.payload))
        for dest in channel.destinations:
            key = ordering_key(dest.ordering_key, metadata)
            delivery_id = str(uuid7())
            deliveries.append(PlannedDelivery(delivery_id, channel.name, dest.name, key or delivery_id, ref))
    if not matched:
        reason = "no channel" if not channels else "no channel matched"
        return Plan(message_id, position, NotRouted(now, reason, misses, position), [])
    return Plan(message_id, position, MessageRouted(now, matched, deliveries, position), payloads)


def plan_message(
    channels: Sequence[Channel],
    store: EventStore,
    message_id: uuid.UUID,
    position: int,
    received: dict[str, Any],
    raw: bytes | None = None,
) -> Plan:
    """Route one stored message, whatever its kind (reads the store, writes nothing): a mail
    or a REST submission as items (engine/route_items.py), anything else as HL7 (`raw`: its
    payload when the caller read it already)."""
    if received.get("protocol") in SUBMISSION_PROTOCOLS:
        events = [(r.topic, r.event) for r in store.events_of(message_id)]
        request = store.payload(received["payload"]["sha256"]) if received.get("protocol") == "rest" else b""
        items = items_of(received, events, request)
        return Plan(message_id, position, route_items(channels, items, received.get("listener", ""), position), [])
    if raw is None:
        raw = store.payload(received["payload"]["sha256"])
    return plan_routes(channels, message_id, position, received, raw, store.inline_limit)


class RoutingDecisions:
    """The routing decisions the HL7 intake waits for (enhanced-mode application ACKs):
    completed when the appendix that records them is committed, or read from the log for
    an older message. Lives in the process that owns the writer, wherever routing runs."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._waiting: dict[uuid.UUID, list[asyncio.Future[MessageRouted | NotRouted]]] = {}
        self._recent: OrderedDict[uuid.UUID, MessageRouted | NotRouted | EncodedEvent] = OrderedDict()

    async def decision(self, message_id: uuid.UUID, timeout: float = 30.0) -> MessageRouted | NotRouted | None:
        """The routing decision for a message, once committed (None if it takes too long)."""
        known = self._recent.get(message_id)
        if isinstance(known, EncodedEvent):
            known = self._recent[message_id] = _decision_of(known)
        if known is not None:
            return known
        fut: asyncio.Future[MessageRouted | NotRouted] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(message_id, []).append(fut)
        # An older message (a resend after a lost application ACK): its decision is in the log.
        recorded = await in_thread(self._recorded_decision, message_id)
        if recorded is not None and not fut.done():
            fut.set_result(recorded)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters = self._waiting.get(message_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiting.pop(message_id, None)

    def _recorded_decision(self, message_id: uuid.UUID) -> MessageRouted | NotRouted | None:
        for record in reversed(self.store.events_of(message_id)):
            if record.topic in DECISION_TOPICS:
                return _decision(record.topic, record.event)
        return None

    def committed(self, appendix: Appendix) -> None:
        """Wake the application ACKs waiting for the decisions of a committed appendix."""
        for message_id, event in appendix.events:
            if isinstance(event, EncodedEvent):  # from the router process: decoded if asked
                if event.topic not in DECISION_TOPICS:
                    continue
                waiting = self._waiting.pop(message_id, None)
                if waiting:
                    self._completed(message_id, _decision_of(event), waiting)
                else:
                    self._recent[message_id] = event
                continue
            if isinstance(event, MessageRouted | NotRouted):
                self._completed(message_id, event, self._waiting.pop(message_id, []))
        while len(self._recent) > 10_000:
            self._recent.popitem(last=False)

    def _completed(
        self,
        message_id: uuid.UUID,
        event: MessageRouted | NotRouted,
        waiting: list[asyncio.Future[MessageRouted | NotRouted]],
    ) -> None:
        self._recent[message_id] = event
        for fut in waiting:
            if not fut.done():
                fut.set_result(event)


DECISION_TOPICS = frozenset({"relais.MessageRouted", "relais.NotRouted"})


def _decision(topic: str, event: dict[str, Any]) -> MessageRouted | NotRouted:
    """A decision read back (what an application ACK needs: not the planned deliveries)."""
    if topic == "relais.MessageRouted":
        return MessageRouted(**{**event, "deliveries": []})
    return NotRouted(**event)


def _decision_of(event: EncodedEvent) -> MessageRouted | NotRouted:
    return _decision(event.topic, orjson.loads(event.body))


class Router(LogFollower):
    name = "router"
    min_interval = 0.01
    # A round's plan reads what the edge stored, never what routing wrote: the next round
    # is planned while this one commits (a round of 500 messages: ~70 ms each, §25).
    pipelined = True

    def __init__(
        self,
        store: EventStore,
        ingestor: Appender,
        channels: Sequence[Channel],
        decisions: RoutingDecisions | None = None,
    ) -> None:
        super().__init__(store, ingestor)
        self.channels: tuple[Channel, ...] = tuple(channels)
        # Who waits for a routing decision (HL7 application ACKs), and the latest decisions.
        self.decisions = decisions or RoutingDecisions(store)

    async def decision(self, message_id: uuid.UUID, timeout: float = 30.0) -> MessageRouted | NotRouted | None:
        """The routing decision for a message, once committed (None if it takes too long)."""
        return await self.decisions.decision(message_id, timeout)

    def committed(self, appendix: Appendix) -> None:
        self.decisions.committed(appendix)

    def reload(self, channels: Sequence[Channel]) -> None:
        """Swap the channels; messages from now on use the new ones."""
        self.channels = tuple(channels)

    def plan(self, after: int) -> tuple[Appendix, int]:
        """Route the next chunk of the log; returns (what to append, new position)."""
        store = self.store
        notes = store.recorder.select_notifications(
            start=after + 1, limit=self.batch_size, topics=["relais.MessageReceived"]
        )
        if not notes:
            return Appendix(), after
        ids = [str(n.originator_id) for n in notes]
        statuses = {
            r["message_id"]: r["status"]
            for r in store.query(
                f"SELECT message_id, status FROM relais_messages WHERE message_id IN ({','.join('?' * len(ids))})",
                ids,
            )
        }
        appendix = Appendix()
        outbox_rows: list[tuple[Any, ...]] = []
        detail_rows: list[tuple[Any, ...]] = []
        channels = self.channels
        now = _now()
        todo: list[tuple[Any, uuid.UUID, dict[str, Any]]] = []
        for note in notes:
            message_id = uuid.UUID(str(note.originator_id))
            if statuses.get(str(message_id)) != "accepted":
                continue  # refused at the edge: answered already, nothing to route
            received = store.decode(note).event
            if received.get("protocol") == "dicom":
                continue  # DICOM instances are routed as studies, once complete (engine/study_router.py)
            todo.append((note, message_id, received))
        # The HL7 payloads of the chunk in one read, not one query per message.
        raws = store.payloads(
            r["payload"]["sha256"] for _, _, r in todo if r.get("protocol") not in SUBMISSION_PROTOCOLS
        )
        for note, message_id, received in todo:
            plan = plan_message(channels, store, message_id, note.id, received, raws.get(received["payload"]["sha256"]))
            appendix.events.append((message_id, plan.routed))
            appendix.payloads.extend(plan.payloads)
            if isinstance(plan.routed, MessageRouted):
                for i, d in enumerate(plan.routed.deliveries):
                    outbox_rows.append(
                        (
                            d.delivery_id, str(message_id), d.channel, d.destination, d.ordering_key,
                            note.id * 1000 + i, d.payload.sha256, d.payload.content_type, "pending",
                            0, 0, now, "", now, now,
                        )
                    )  # fmt: skip
                    if d.details:
                        detail_rows.append((d.delivery_id, orjson.dumps(d.details).decode()))
        if outbox_rows:
            appendix.statements.append((OUTBOX_INSERT, outbox_rows))
        if detail_rows:
            appendix.statements.append((DETAILS_INSERT, detail_rows))
        position = notes[-1].id
        self.track(appendix, position)
        return appendix, position
