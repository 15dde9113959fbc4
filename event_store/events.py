"""The vocabulary of Relais: every fact the log can hold, one frozen dataclass each.

Events are encoded once with orjson into eventsourcing `StoredEvent`s; their topic is
`relais.<ClassName>`. They carry no behaviour: the engine and read models interpret them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "EVENT_TYPES",
    "DuplicateReceived",
    "Event",
    "MessageReceived",
    "MessageRejected",
    "PayloadRef",
    "topic_of",
]


@dataclass(frozen=True, slots=True)
class PayloadRef:
    """Where the raw bytes are: their SHA-256, size, content type and storage place."""

    sha256: str
    size: int
    content_type: str
    inline: bool  # True: payload table in the store's database; False: blob folder


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event: when it was recorded (ISO-8601 UTC)."""

    recorded_at: str
    topic_prefix: ClassVar[str] = "relais."


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """A message arrived on a listener; its raw bytes are stored as `payload`.

    `metadata` is what the edge read (message type, control ID, sender, identifiers...);
    `flags` notes what is unusual but accepted (e.g. `control_id_reused`).
    """

    listener: str
    protocol: str
    peer: str
    payload: PayloadRef
    metadata: dict[str, Any]
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MessageRejected(Event):
    """The message was refused; `code` is the protocol answer (AE/AR/CE/CR...).

    `error_code` is the HL7 table 0357 code (or the protocol's equivalent), `location`
    where the problem is (`PID-3`), `reason` a sentence free of patient data.
    """

    code: str
    error_code: str
    reason: str
    location: str = ""


@dataclass(frozen=True, slots=True)
class DuplicateReceived(Event):
    """The same sender resent the same control ID with the same bytes; nothing is re-done."""

    listener: str
    peer: str


EVENT_TYPES: dict[str, type[Event]] = {
    f"relais.{cls.__name__}": cls for cls in (MessageReceived, MessageRejected, DuplicateReceived)
}


def topic_of(event: Event) -> str:
    return f"relais.{type(event).__name__}"
