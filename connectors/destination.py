"""What every outbound connector implements: one `Delivery` in, a `DeliveryOutcome` out.

The engine decides what to send, where and when (outbox, retries, ordering); a destination
only speaks its protocol. DICOM (C-STORE SCU) and SMTP destinations plug in the same way.

    >>> dest = FileDrop.from_settings(name="drop", settings={"folder": "out"})
    >>> outcome = await dest.deliver(delivery)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Delivery", "DeliveryOutcome", "Destination", "PermanentFailure", "TemporaryFailure"]


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
    name: str

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        """Send it; raise TemporaryFailure or PermanentFailure when it was not accepted."""

    async def close(self) -> None:
        """Release connections."""
