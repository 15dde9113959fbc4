"""MSSanté receipts: a disposition notification (RFC 8098) for every mail that asked for one
(`Disposition-Notification-To`), `processed` or `processed/error` with the integration
error's code and label, planned from the log and delivered through the outbox.

A log follower (`MdnPlanner`) reads `MailReceived` events after its tracked position and, in
one commit with that position, stores the MDN, records `MdnQueued` and writes the outbox
row (channel `mdn`, destination = the listener's name). `MdnDelivery` is the engine's
delivery worker limited to those rows, so MDNs get the same attempts, backoff and dead
letters (`DeliveryAttempted`/`Delivered`/`DeliveryFailed`/`DeadLettered` on the mail's
stream) without touching the router or the routes.
"""

from __future__ import annotations

import email.utils
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from engine.delivery import DeliveryWorkers
from engine.follower import LogFollower
from engine.ingest import Appendix, Writer, uuid7
from engine.mail_intake import INTEGRATION_ERRORS
from engine.outbox import OUTBOX_INSERT
from event_store import EventStore
from event_store.events import MdnQueued
from event_store.store import payload_ref

__all__ = ["MDN_CHANNEL", "MdnDelivery", "MdnPlanner", "build_mdn"]

MDN_CHANNEL = "mdn"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _clean(value: str) -> str:
    """A header value on one line (no CR/LF from the original mail can inject headers)."""
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())[:900]


def build_mdn(
    *,
    reporting_host: str,
    mdn_from: str,
    to: str,
    final_recipient: str,
    original_message_id: str,
    original_subject: str,
    error: tuple[str, str] | None,
    mdn_id: str,
) -> bytes:
    """An RFC 8098 `multipart/report; report-type=disposition-notification`, CRLF lines."""
    boundary = f"=_relais_mdn_{mdn_id}"
    if error is None:
        disposition = "automatic-action/MDN-sent-automatically; processed"
        text = f"Le message {_clean(original_message_id)} a été reçu et intégré."
    else:
        disposition = "automatic-action/MDN-sent-automatically; processed/error"
        text = (
            f"Le message {_clean(original_message_id)} a été reçu mais n'a pas pu être intégré : {error[0]} {error[1]}"
        )
    fields = [
        f"Reporting-UA: {reporting_host}; Relais",
        f"Final-Recipient: rfc822;{_clean(final_recipient)}",
        f"Original-Message-ID: {_clean(original_message_id)}",
        f"Disposition: {disposition}",
    ]
    if error is not None:
        fields.append(f"Error: {error[0]} {error[1]}")
    subject = _clean(original_subject)
    headers = [
        f"From: {mdn_from}",
        f"To: {_clean(to)}",
        f"Subject: =?utf-8?b?{_b64(('Accusé de traitement : ' + subject).encode())}?=",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{mdn_id}@{reporting_host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(headers),
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        text,
        f"--{boundary}",
        "Content-Type: message/disposition-notification",
        "",
        "\r\n".join(fields),
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(parts).encode()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


class MdnPlanner(LogFollower):
    """Queues an MDN for each mail that asked for one, on listeners that have an MDN relay."""

    name = "mdn"
    min_interval = 0.05
    idle_interval = 0.1

    def __init__(self, store: EventStore, ingestor: Writer, senders: Mapping[str, tuple[str, str]]) -> None:
        super().__init__(store, ingestor)
        self.senders = dict(senders)  # listener name -> (reporting host, MDN From address)

    def plan(self, after: int) -> tuple[Appendix, int]:
        store = self.store
        notes, position = self.select(after, ["relais.MailReceived"])
        if not notes:
            return Appendix(), position
        appendix = Appendix()
        rows: list[tuple[Any, ...]] = []
        now = _now()
        for note in notes:
            mail = store.decode(note).event
            to = mail.get("disposition_notification_to") or ""
            if not to:
                continue
            message_id = uuid.UUID(str(note.originator_id))
            stream = store.events_of(message_id)
            listener = stream[0].event.get("listener", "")
            if listener not in self.senders:
                continue
            failed = next((e.event for e in stream if e.topic == "relais.MailIntegrationFailed"), None)
            error = None
            if failed is not None:
                error = (failed["code"], failed.get("label") or INTEGRATION_ERRORS.get(failed["code"], ""))
            host, mdn_from = self.senders[listener]
            delivery_id = str(uuid7())
            raw = build_mdn(
                reporting_host=host, mdn_from=mdn_from, to=to,
                final_recipient=(mail.get("envelope_to") or [""])[0],
                original_message_id=mail.get("message_id", ""), original_subject=mail.get("subject", ""),
                error=error, mdn_id=delivery_id,
            )  # fmt: skip
            ref = payload_ref(raw, "message/rfc822", store.inline_limit)
            disposition = "failed" if error else "processed"
            appendix.events.append(
                (message_id, MdnQueued(now, delivery_id, to, disposition, error[0] if error else "", ref))
            )
            appendix.payloads.append((ref, raw))
            rows.append(
                (
                    delivery_id, str(message_id), MDN_CHANNEL, listener, delivery_id, note.id * 1000 + 999,
                    ref.sha256, ref.content_type, "pending", 0, 0, now, "", now, now,
                )
            )  # fmt: skip
        if rows:
            appendix.statements.append((OUTBOX_INSERT, rows))
        self.track(appendix, position)
        return appendix, position


class MdnDelivery(DeliveryWorkers):
    """The delivery workers for MDN rows only (their targets are the listeners' MDN relays).
    Operators' redeliver requests are left to the routing workers, which carry them out for
    every outbox row, MDNs included."""

    async def _carry_out_requests(self) -> None:
        return None
