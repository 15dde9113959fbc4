"""The `identity` destination: a channel feeds the regional identity read model.

    [[destination]]
    name = "regional-identity"
    type = "identity"
    ordering_key = "sender"     # one facility's identity feed stays in order

Each delivery (an ADT, already filtered and transformed by the channel) is applied to the
model (read_models/identity.py) and recorded as `IdentityUpdated` on the message, rows and
event in one commit through the writer. Deliveries are applied one at a time, and a
redelivered one changes nothing twice. A message the model cannot take (A47 for an
unknown identifier...) is a permanent failure: it goes to the dead letters, where the
identity team sees it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure
from connectors.registry import KINDS, DestinationKind
from engine.er7 import Er7Error, Er7Message
from engine.hl7_intake import decode_hl7, read_identifiers
from engine.ingest import Appender, Appendix, IngestUnavailable, uuid7
from engine.tasks import in_thread
from event_store import EventStore
from event_store.events import IdentityUpdated
from read_models.identity import (
    APPLIED,
    IDENTITY_TABLES,
    Ident,
    IdentityChange,
    IdentityError,
    PatientFacts,
    apply,
)

__all__ = ["IdentityDestination", "IdentitySettings", "StoreLookup", "ensure_identity_tables", "patient_facts"]


class IdentitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    regional_prefix: str = Field("RRI", pattern=r"^[A-Z0-9-]{1,16}$", description="prefix of new regional identifiers")
    default_charset: str = "iso-8859-15"


def ensure_identity_tables(store: EventStore) -> None:
    for statement in IDENTITY_TABLES:
        store.execute(statement)


def _idents(msg: Er7Message, segment: str, field: int) -> list[Ident]:
    return [
        Ident(i["authority_oid"] or i["authority"], i["id"], i["type"]) for i in read_identifiers(msg, segment, field)
    ]


def patient_facts(msg: Er7Message) -> PatientFacts:
    """PID-3/5/7/8/32 and MRG-1 of an ADT, as the identity model reads them."""
    if not msg.has_segment("PID"):
        raise IdentityError("no PID segment")
    v = msg.value
    codes = [msg.components(r)[0][0] for r in msg.repetitions("PID", 32)]
    reliability = next((c for c in codes if c not in {"HOMA", "FICT", "DOUT"}), "")
    return PatientFacts(
        trigger=v("MSH", 9, 2),
        identifiers=_idents(msg, "PID", 3),
        previous=_idents(msg, "MRG", 1) if msg.has_segment("MRG") else [],
        family=v("PID", 5, 1),
        given=v("PID", 5, 2),
        birth_date=v("PID", 7),
        sex=v("PID", 8),
        reliability=reliability,
    )


class StoreLookup:
    """The model as it stands in the store's tables."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def owners(self, idents: list[Ident]) -> dict[Ident, str]:
        out = {}
        for ident in idents:
            rows = self.store.query(
                "SELECT rri FROM relais_identity_ids WHERE authority = ? AND value = ?", [ident.authority, ident.value]
            )
            if rows:
                out[ident] = rows[0]["rri"]
        return out

    def person(self, rri: str) -> dict[str, Any] | None:
        rows = self.store.query("SELECT * FROM relais_identity_persons WHERE rri = ?", [rri])
        return rows[0] if rows else None

    def namesakes(self, key: str) -> list[str]:
        rows = self.store.query(
            "SELECT rri FROM relais_identity_persons WHERE name_key = ? AND status = 'active' ORDER BY created_at",
            [key],
        )
        return [r["rri"] for r in rows]


class IdentityDestination:
    """Applies deliveries to the identity model; needs the engine's store and writer (`bind`)."""

    def __init__(self, name: str, settings: IdentitySettings) -> None:
        self.name = name
        self.settings = settings
        self._store: EventStore | None = None
        self._ingestor: Appender | None = None
        self._lock = asyncio.Lock()  # one change at a time: each reads what the previous wrote
        self.max_in_flight = 1

    def bind(self, store: EventStore, ingestor: Appender) -> None:
        self._store = store
        self._ingestor = ingestor

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        if self._store is None or self._ingestor is None:
            raise TemporaryFailure("identity model not bound to a running engine")
        async with self._lock:
            planned = await in_thread(self._plan, self._store, delivery)
            if isinstance(planned, str):  # applied before (redelivery after a crash)
                return DeliveryOutcome(detail=planned)
            change, appendix = planned
            try:
                await self._ingestor.append(appendix)
            except IngestUnavailable as e:
                raise TemporaryFailure(f"store unavailable ({e})") from None
        return DeliveryOutcome(detail=change.detail)

    def _plan(self, store: EventStore, delivery: Delivery) -> str | tuple[IdentityChange, Appendix]:
        done = store.query("SELECT detail FROM relais_identity_applied WHERE delivery_id = ?", [delivery.delivery_id])
        if done:
            return str(done[0]["detail"])
        try:
            text, _, _ = decode_hl7(delivery.payload, self.settings.default_charset)
            facts = patient_facts(Er7Message.parse(text))
        except (Er7Error, UnicodeDecodeError, LookupError) as e:
            raise PermanentFailure(f"not a readable HL7 message ({type(e).__name__})") from None
        except IdentityError as e:
            raise PermanentFailure(str(e)) from None
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        try:
            change = apply(
                facts, StoreLookup(store), message_id=delivery.message_id, now=now,
                new_rri=lambda: f"{self.settings.regional_prefix}{uuid7().hex[:20].upper()}",
            )  # fmt: skip
        except IdentityError as e:
            raise PermanentFailure(str(e)) from None
        change.add(APPLIED, delivery.delivery_id, delivery.message_id, change.detail)
        event = IdentityUpdated(
            now, delivery.delivery_id, change.rri, change.action, change.linked, change.unlinked,
            change.merged_from, change.suspected_duplicates, change.ignored,
        )  # fmt: skip
        return change, Appendix(events=[(uuid.UUID(delivery.message_id), event)], statements=change.statements)

    async def close(self) -> None:
        return None


KINDS["identity"] = DestinationKind(IdentitySettings, IdentityDestination)
