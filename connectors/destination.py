"""What every outbound connector implements: one `Delivery` in, a `DeliveryOutcome` out.

The engine decides what to send, where and when (outbox, retries, ordering); a destination
only speaks its protocol. DICOM (C-STORE SCU) and SMTP destinations plug in the same way.

    >>> dest = FileDrop.from_settings(name="drop", settings={"folder": "out"})
    >>> outcome = await dest.deliver(delivery)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT", "Delivery", "DeliveryOutcome", "Destination", "PermanentFailure", "TemporaryFailure",
    "max_in_flight",
]  # fmt: skip

DEFAULT_MAX_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to hand to one destination (already transformed, already durable)."""

    delivery_id: str
    message_id: str
    channel: str
    destination: str
    payload: bytes
    content_type: str  # application/hl7-v2, application/json, application/dicom...
    metadata: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What the partner answered; `detail` is short, free of patient data (e.g. 'MSA AA')."""

    detail: str = ""
    response: bytes = b""


class TemporaryFailure(Exception):
    """Worth retrying (timeout, connection refused, AE, HTTP 503...)."""


class PermanentFailure(Exception):
    """Retrying cannot help (AR with a rejected structure, HTTP 400...): dead-letter now."""


class Destination(Protocol):
    """A destination may set `max_in_flight`, the deliveries it can carry at once (an MLLP
    destination: its connections); the delivery workers never give it more at a time, so a
    partner that is slow or silent holds none of the attempts other destinations need.
    Without it: DEFAULT_MAX_IN_FLIGHT."""

    name: str

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        """Send it; raise TemporaryFailure or PermanentFailure when it was not accepted."""

    async def close(self) -> None:
        """Release connections."""


def max_in_flight(destination: Destination) -> int:
    """How many deliveries `destination` carries at once (see `Destination`)."""
    return max(1, int(getattr(destination, "max_in_flight", DEFAULT_MAX_IN_FLIGHT)))
