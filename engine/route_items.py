"""What the router sees of a mail or a REST submission: one routing item for the whole
submission (kind "mail" or "rest") and one per document it carries (kind "document").

Items are read from the message's own events (MailReceived, DocumentSubmitted,
SubmissionAccepted); their payloads are the already stored, content-addressed ones (no
byte is copied). HL7 transforms do not apply: what is delivered is what was received.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.er7 import Er7Message
from engine.ingest import uuid7
from engine.routes import Channel, RouteInput, _evaluate, ordering_key
from event_store import PayloadRef
from event_store.events import MessageRouted, NotRouted, PlannedDelivery

__all__ = ["SUBMISSION_PROTOCOLS", "RouteItem", "items_of", "route_items", "takes"]

# Protocols whose messages are routed as items (the others are HL7, or DICOM studies).
SUBMISSION_PROTOCOLS = frozenset({"smtp", "rest"})
# Field filters (HL7 paths) find nothing in a submission: they see an empty message.
_NO_MESSAGE = Er7Message.parse("MSH|^~\\&|")


@dataclass(frozen=True, slots=True)
class RouteItem:
    """One thing a channel can take: its kind, stored payload, filterable metadata and
    what a destination is told about it (`details`: filename, content type...)."""

    kind: str  # mail | rest | document
    label: str  # names the item in NotRouted reasons: mail, rest, document[0]...
    payload: PayloadRef
    metadata: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)


def _ref(value: dict[str, Any]) -> PayloadRef:
    return PayloadRef(value["sha256"], int(value["size"]), value["content_type"], bool(value["inline"]))


def _flatten(details: dict[str, Any]) -> dict[str, Any]:
    """Nested request fields as dotted keys: {"patient": {"ins": x}} -> {"patient.ins": x}."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, dict | list)})
        else:
            out[key] = value
    return out


def _patient(ins: str, oid: str, fallback: list[Any]) -> list[Any]:
    return [{"id": ins, "type": "INS", "authority_oid": oid}] if ins else list(fallback)


def items_of(
    received: dict[str, Any], events: Sequence[tuple[str, dict[str, Any]]], request: bytes = b""
) -> list[RouteItem]:
    """The routing items of one stored mail or REST submission (`events`: its stream as
    (topic, event) pairs; `request`: a REST submission's stored payload, its canonical JSON)."""
    meta = dict(received.get("metadata") or {})
    protocol = received.get("protocol", "")
    common = {"protocol": protocol, "listener": received.get("listener", "")}
    raw = _ref(received["payload"])
    items: list[RouteItem] = []
    if protocol == "smtp":
        mail = next((e for t, e in events if t == "relais.MailReceived"), {})
        parent = {
            **meta,
            **common,
            "subject": mail.get("subject", ""),
            "header_from": mail.get("header_from", ""),
            "xdm": mail.get("xdm", ""),
            **(mail.get("mss_headers") or {}),
        }
        names = [a.get("filename", "") for a in mail.get("attachments") or []]
        items.append(RouteItem("mail", "mail", raw, {**parent, "filenames": names}, {"kind": "mail"}))
        docs = [e for t, e in events if t == "relais.DocumentSubmitted"]
        for i, d in enumerate(docs):
            ref = _ref(d["payload"])
            own = {
                **(d.get("metadata") or {}),
                "document_id": d["document_id"],
                "document_source": d["source"],
                "filename": d["filename"],
                "content_type": ref.content_type,
                "size": ref.size,
                "patient_id": d["patient_id"],
                "patient_id_authority": d["patient_id_authority"],
                "patient_identifiers": _patient(
                    d["patient_id"], d["patient_id_authority"], parent.get("patient_identifiers", [])
                ),
                "class_code": d["class_code"],
                "type_code": d["type_code"],
                "author": d["author"],
                "confidentiality": d["confidentiality"],
            }
            details = {"kind": "document", "filename": d["filename"], "content_type": ref.content_type,
                       "document_id": d["document_id"]}  # fmt: skip
            items.append(RouteItem("document", f"document[{i}]", ref, {**parent, **own}, details))
        return items
    accepted = next((e for t, e in events if t == "relais.SubmissionAccepted"), None)
    details = _flatten((accepted or {}).get("details") or {})
    parent = {**meta, **details, **common}
    items.append(RouteItem("rest", "rest", raw, parent, {"kind": "rest"}))
    if accepted is None:
        return items
    # The canonical request (the message's payload) names each document's metadata; the
    # documents' refs are in SubmissionAccepted, in the same order.
    try:
        described = list(orjson.loads(request).get("documents") or []) if request else []
    except (orjson.JSONDecodeError, AttributeError):
        described = []
    for i, value in enumerate(accepted.get("documents") or []):
        ref = _ref(value)
        entry = described[i] if i < len(described) else {}
        ins = str(details.get("patient.ins", ""))
        own = {
            "document_id": ref.sha256,
            "document_source": "rest",
            "filename": entry.get("filename", ""),
            "content_type": ref.content_type,
            "size": ref.size,
            "patient_id": ins,
            "patient_id_authority": str(details.get("patient.ins_oid", "")) if ins else "",
            "class_code": "",
            "type_code": entry.get("type_code", ""),
            "title": entry.get("title", ""),
            "author": str(details.get("author.rpps", "") or details.get("requester.rpps", "")),
            "confidentiality": entry.get("confidentiality", ""),
            "submission_kind": accepted.get("kind", ""),
        }
        det = {"kind": "document", "filename": own["filename"], "content_type": ref.content_type}
        items.append(RouteItem("document", f"document[{i}]", ref, {**parent, **own}, det))
    return items


def takes(channel: Channel, item: RouteItem, listener: str) -> str:
    """Empty when the channel takes the item; else why not (first failing check)."""
    spec = channel.spec
    if not spec.enabled:
        return "channel disabled"
    if item.kind not in spec.source.kinds:
        return f"source kind {item.kind!r} not taken"
    if spec.source.listeners and listener not in spec.source.listeners:
        return f"listener {listener!r} not a source"
    if spec.filter is not None:
        ok, why = _evaluate(spec.filter, RouteInput(_NO_MESSAGE, item.metadata, listener, item.kind), "filter")
        if not ok:
            return why
    return ""


def route_items(
    channels: Sequence[Channel], items: Sequence[RouteItem], listener: str, position: int
) -> MessageRouted | NotRouted:
    """The routing decision for one submission's items (pure): every delivery of every
    matching channel, or why each channel took none of them."""
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    matched: list[str] = []
    deliveries: list[PlannedDelivery] = []
    misses: dict[str, str] = {}
    for channel in channels:
        reasons = []
        took = False
        for item in items:
            why = takes(channel, item, listener)
            if why:
                reasons.append((item, why))
                continue
            took = True
            for dest in channel.destinations:
                delivery_id = str(uuid7())
                key = ordering_key(dest.ordering_key, item.metadata) or delivery_id
                deliveries.append(PlannedDelivery(delivery_id, channel.name, dest.name, key, item.payload,
                                                  dict(item.details)))  # fmt: skip
        if took:
            matched.append(channel.name)
            continue
        taken = [(item, why) for item, why in reasons if item.kind in channel.spec.source.kinds]
        if not channel.spec.enabled or not taken:
            kinds = " or ".join(dict.fromkeys(repr(i.kind) for i in items))
            misses[channel.name] = "channel disabled" if not channel.spec.enabled else f"source kind {kinds} not taken"
        else:
            misses[channel.name] = "; ".join(f"{item.label}: {why}" for item, why in taken[:5])
    if not matched:
        return NotRouted(now, "no channel" if not channels else "no channel matched", misses, position)
    return MessageRouted(now, matched, deliveries, position)
