"""Integrators' tools over channels: check files, run their `[[test]]` cases, and try a
channel that is not deployed against stored history (dry-run: nothing is delivered).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.er7 import Er7Message
from engine.hl7_intake import decode_hl7, read_metadata
from engine.route_items import RouteItem, takes
from engine.router import plan_message
from engine.routes import Channel, RouteInput, RouteTest
from event_store import EventStore, PayloadRef
from event_store.events import MessageRouted

__all__ = ["DryRun", "TestOutcome", "dry_run", "run_route_tests"]


@dataclass
class TestOutcome:
    channel: str
    name: str
    ok: bool
    problems: list[str] = field(default_factory=list)


def run_route_tests(channels: list[Channel]) -> list[TestOutcome]:
    """Every `[[test]]` of every channel: expected destinations and field values."""
    outcomes = []
    for channel in channels:
        for i, test in enumerate(channel.spec.test):
            name = test.name or f"test[{i}]"
            if test.input is None:  # a mail, document, REST submission or study: metadata only
                outcomes.append(_test_item(channel, name, test))
                continue
            raw = (channel.path.parent / test.input).read_bytes()
            text, codec, _ = decode_hl7(raw, "iso-8859-15")
            message = Er7Message.parse(text)
            item = RouteInput(message, read_metadata(message), test.listener, "hl7")
            # Tests check the channel's logic even while it is switched off.
            result = _route_ignoring_enabled(channel, item, codec)
            problems = []
            got = [d.name for d in channel.destinations] if result.matched else []
            if sorted(got) != sorted(test.expect_destinations):
                why = f" ({result.reason})" if not result.matched else ""
                problems.append(f"destinations: expected {test.expect_destinations}, got {got}{why}")
            if result.matched:
                out = Er7Message.parse(result.text)
                for path, expected in test.expect_fields.items():
                    actual = out.get(path)
                    if actual != expected:
                        problems.append(f"{path}: expected {expected!r}, got {actual!r}")
            outcomes.append(TestOutcome(channel.name, name, not problems, problems))
    return outcomes


def _test_item(channel: Channel, name: str, test: RouteTest) -> TestOutcome:
    live = Channel(channel.name, channel.path, channel.spec.model_copy(update={"enabled": True}))
    item = RouteItem(test.kind, test.kind, PayloadRef("", 0, "", True), dict(test.metadata))
    why = takes(live, item, test.listener)
    got = [] if why else [d.name for d in channel.destinations]
    problems = []
    if sorted(got) != sorted(test.expect_destinations):
        problems.append(f"destinations: expected {test.expect_destinations}, got {got}" + (f" ({why})" if why else ""))
    return TestOutcome(channel.name, name, not problems, problems)


def _route_ignoring_enabled(channel: Channel, item: RouteInput, codec: str) -> Any:
    if channel.spec.enabled:
        return channel.route(item, codec)
    live = Channel(channel.name, channel.path, channel.spec.model_copy(update={"enabled": True}))
    return live.route(item, codec)


@dataclass
class DryRun:
    examined: int = 0
    routed: int = 0
    per_destination: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (message id, before, after)


def dry_run(store: EventStore, channel: Channel, since: str, until: str | None = None, samples: int = 3) -> DryRun:
    """Run stored accepted messages received in [since, until) through `channel`: HL7 over
    MLLP, and mails / REST submissions when the channel takes mail, document or rest."""
    protocols = ["mllp"] if "hl7" in channel.spec.source.kinds else []
    if {"mail", "document"} & set(channel.spec.source.kinds):
        protocols.append("smtp")
    if {"rest", "document"} & set(channel.spec.source.kinds):
        protocols.append("rest")
    if not protocols:
        return DryRun()
    sql = (
        "SELECT message_id FROM relais_messages WHERE status = 'accepted' "
        f"AND protocol IN ({','.join('?' * len(protocols))}) AND received_at >= ?"
    )
    params: list[Any] = [*protocols, since]
    if until:
        sql += " AND received_at < ?"
        params.append(until)
    sql += " ORDER BY received_at"
    live = Channel(channel.name, channel.path, channel.spec.model_copy(update={"enabled": True}))
    report = DryRun()
    for row in store.query(sql, params):
        message_id = uuid.UUID(row["message_id"])
        events = store.events_of(message_id)
        if not events:
            continue
        received = events[0].event
        plan = plan_message([live], store, message_id, 0, received)
        report.examined += 1
        if isinstance(plan.routed, MessageRouted):
            report.routed += 1
            for d in plan.routed.deliveries:
                report.per_destination[d.destination] += 1
            if len(report.samples) < samples and plan.payloads:  # HL7: what the transforms changed
                raw = store.payload(received["payload"]["sha256"])
                codec = received.get("metadata", {}).get("decoded_as") or "utf-8"
                after = plan.payloads[0][1].decode(codec, errors="replace")
                report.samples.append((str(message_id), raw.decode(codec, errors="replace"), after))
        else:
            for reason in plan.routed.misses.values() or [plan.routed.reason]:
                report.misses[reason] += 1
    return report


def describe_changes(before: str, after: str) -> list[str]:
    """Segment lines that differ, as `- old` / `+ new` (identifiers left to the reader)."""
    old = [s for s in before.replace("\n", "\r").split("\r") if s]
    new = [s for s in after.replace("\n", "\r").split("\r") if s]
    lines = []
    for i in range(max(len(old), len(new))):
        a = old[i] if i < len(old) else ""
        b = new[i] if i < len(new) else ""
        if a != b:
            if a:
                lines.append(f"  - {a}")
            if b:
                lines.append(f"  + {b}")
    return lines
