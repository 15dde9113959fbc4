"""Routes completed studies: each `StudyCompleted` goes through the channels whose source
kinds include "dicom-study", filtered on the study's metadata (modality, calling_ae,
institution_name, referring_facility, accession_number...).

The delivery payload is the study's manifest (its instances' payload hashes), already
stored with `StudyCompleted`; a DICOM destination reads the instances from the store. HL7
transforms do not apply to studies (patient-ID rewrite is a DICOM destination setting).
`MessageRouted`/`NotRouted`, the outbox rows and the position commit together: exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from engine.er7 import Er7Message
from engine.follower import LogFollower
from engine.ingest import Appendix, Writer, uuid7
from engine.outbox import OUTBOX_INSERT
from engine.routes import Channel, RouteInput, _evaluate, ordering_key
from event_store import EventStore, PayloadRef
from event_store.events import MessageRouted, NotRouted, PlannedDelivery

__all__ = ["StudyRouter", "route_study"]

KIND = "dicom-study"
# Field filters (HL7 paths) find nothing in a study: they see an empty message.
_NO_MESSAGE = Er7Message.parse("MSH|^~\\&|")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def route_study(channels: Sequence[Channel], completed: dict[str, Any], position: int) -> MessageRouted | NotRouted:
    """The routing decision for one StudyCompleted (pure)."""
    metadata = completed.get("metadata", {})
    item = RouteInput(_NO_MESSAGE, metadata, "", KIND)
    manifest = PayloadRef(**completed["manifest"])
    matched, deliveries, misses = [], [], {}
    for channel in channels:
        spec = channel.spec
        if not spec.enabled:
            misses[channel.name] = "channel disabled"
            continue
        if KIND not in spec.source.kinds:
            misses[channel.name] = f"source kind {KIND!r} not taken"
            continue
        if spec.filter is not None:
            ok, why = _evaluate(spec.filter, item, "filter")
            if not ok:
                misses[channel.name] = why
                continue
        matched.append(channel.name)
        for dest in channel.destinations:
            delivery_id = str(uuid7())
            key = ordering_key(dest.ordering_key, metadata) or delivery_id
            deliveries.append(PlannedDelivery(delivery_id, channel.name, dest.name, key, manifest))
    now = _now()
    if not matched:
        return NotRouted(now, "no channel" if not channels else "no channel matched", misses, position)
    return MessageRouted(now, matched, deliveries, position)


class StudyRouter(LogFollower):
    name = "study-router"
    min_interval = 0.05
    idle_interval = 0.1

    def __init__(self, store: EventStore, ingestor: Writer, channels: Sequence[Channel]) -> None:
        super().__init__(store, ingestor)
        self.channels: tuple[Channel, ...] = tuple(channels)

    def reload(self, channels: Sequence[Channel]) -> None:
        self.channels = tuple(channels)

    def plan(self, after: int) -> tuple[Appendix, int]:
        notes, position = self.select(after, ["relais.StudyCompleted"])
        if not notes:
            return Appendix(), position
        appendix = Appendix()
        rows: list[tuple[Any, ...]] = []
        now = _now()
        for note in notes:
            study = uuid.UUID(str(note.originator_id))
            decision = route_study(self.channels, self.store.decode(note).event, note.id)
            appendix.events.append((study, decision))
            if isinstance(decision, MessageRouted):
                for i, d in enumerate(decision.deliveries):
                    rows.append(
                        (
                            d.delivery_id, str(study), d.channel, d.destination, d.ordering_key,
                            note.id * 1000 + i, d.payload.sha256, d.payload.content_type, "pending",
                            0, 0, now, "", now, now,
                        )
                    )  # fmt: skip
        if rows:
            appendix.statements.append((OUTBOX_INSERT, rows))
        self.track(appendix, position)
        return appendix, position
