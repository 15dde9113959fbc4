"""Payload integrity: every event's payload must be readable; blobs without event are noted.

A blob with no event is the harmless trace of a crash between fsync and commit; an event
whose payload is missing would be data loss and makes `relais check` fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from event_store.store import EventStore

__all__ = ["PayloadReport", "check_payloads"]


@dataclass
class PayloadReport:
    referenced: int = 0
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


# Events that carry payloads of their own, beyond the message's (a mail's documents, MDNs).
PAYLOAD_TOPICS = ["relais.DocumentSubmitted", "relais.MdnQueued"]


def _event_payloads(store: EventStore) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    position = 1
    while notes := store.recorder.select_notifications(start=position, limit=1000, topics=PAYLOAD_TOPICS):
        for note in notes:
            ref = store.decode(note).event.get("payload") or {}
            rows.append({"payload_sha256": ref.get("sha256"), "payload_inline": ref.get("inline")})
        position = notes[-1].id + 1
    return rows


def check_payloads(store: EventStore) -> PayloadReport:
    report = PayloadReport()
    rows = store.query("SELECT DISTINCT payload_sha256, payload_inline FROM relais_messages")
    seen = {r["payload_sha256"] for r in rows}
    for extra in _event_payloads(store):
        if extra["payload_sha256"] not in seen:
            seen.add(extra["payload_sha256"])
            rows.append(extra)
    referenced_blobs: set[str] = set()
    inline = {r["sha256"] for r in store.query("SELECT sha256 FROM relais_payloads")}
    for row in rows:
        sha = row["payload_sha256"]
        report.referenced += 1
        if row["payload_inline"]:
            if sha not in inline:
                report.missing.append(sha)
        else:
            referenced_blobs.add(sha)
            if not store.blobs.exists(sha):
                report.missing.append(sha)
    report.orphans = sorted(h for h in store.blobs.hashes() if h not in referenced_blobs)
    report.incomplete = sorted(p.name for p in store.blobs.incomplete_writes())
    return report
