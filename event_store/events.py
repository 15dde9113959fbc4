"""The vocabulary of Relais: every fact the log can hold, one frozen dataclass each.

Events are encoded once with orjson into eventsourcing `StoredEvent`s; their topic is
`relais.<ClassName>`. They carry no behaviour: the engine and read models interpret them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "EVENT_TYPES",
    "DeadLettered",
    "Delivered",
    "DeliveryAttempted",
    "DeliveryFailed",
    "DuplicateReceived",
    "EncodedEvent",
    "Event",
    "IdentityUpdated",
    "MessageReceived",
    "MessageRejected",
    "MessageRouted",
    "NotRouted",
    "PayloadRef",
    "PlannedDelivery",
    "Redelivered",
    "SubmissionAccepted",
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


@dataclass(frozen=True, slots=True)
class PlannedDelivery:
    """One delivery the router decided: its transformed payload is stored before any attempt."""

    delivery_id: str
    channel: str
    destination: str
    ordering_key: str
    payload: PayloadRef
    # What the destination is told about a non-HL7 payload (kind, filename, content type).
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MessageRouted(Event):
    """The router matched channels; each planned delivery is now in the outbox."""

    channels: list[str]
    deliveries: list[PlannedDelivery]
    position: int  # the log position of the MessageReceived that was routed


@dataclass(frozen=True, slots=True)
class NotRouted(Event):
    """No channel took the message; `misses` says why, per channel (first failing filter)."""

    reason: str
    misses: dict[str, str]
    position: int


@dataclass(frozen=True, slots=True)
class DeliveryAttempted(Event):
    """A delivery is about to be sent (attempt n)."""

    delivery_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Delivered(Event):
    """The destination accepted the delivery; `detail` is its short answer (e.g. 'MSA AA')."""

    delivery_id: str
    attempt: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeliveryFailed(Event):
    """An attempt failed; another is due at `retry_at` (ISO-8601 UTC)."""

    delivery_id: str
    attempt: int
    error: str
    retry_at: str


@dataclass(frozen=True, slots=True)
class DeadLettered(Event):
    """The delivery gave up (attempts exhausted or permanent failure); `blocks` holds its key."""

    delivery_id: str
    attempt: int
    error: str
    blocks: bool


@dataclass(frozen=True, slots=True)
class Redelivered(Event):
    """An operator asked to deliver again; who asked and why are kept."""

    delivery_id: str
    requested_by: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdentityUpdated(Event):
    """The regional identity read model took this message into account (identity channel).

    `action`: created | updated | identifier_changed | merged. Identifiers are listed as
    `value^type@authority`; `ignored` says what was not used and why (an INS without VALI).
    """

    delivery_id: str
    rri: str
    action: str
    linked: list[str]
    unlinked: list[str]
    merged_from: str
    suspected_duplicates: list[str]
    ignored: list[str]


@dataclass(frozen=True, slots=True)
class SubmissionAccepted(Event):
    """A REST client submitted documents or a telemedicine request (`kind`); each document
    is stored by its hash (`documents`), `details` is the request's metadata."""

    kind: str  # document | telemedicine
    client: str
    documents: list[PayloadRef]
    details: dict[str, Any]


EVENT_TYPES: dict[str, type[Event]] = {
    f"relais.{cls.__name__}": cls
    for cls in (
        MessageReceived, MessageRejected, DuplicateReceived, MessageRouted, NotRouted,
        DeliveryAttempted, Delivered, DeliveryFailed, DeadLettered, Redelivered,
        IdentityUpdated,
        SubmissionAccepted,
    )
}  # fmt: skip


def topic_of(event: Event | EncodedEvent) -> str:
    if isinstance(event, EncodedEvent):
        return event.topic
    return f"relais.{type(event).__name__}"


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """An event another process already encoded (its JSON object, as orjson writes it):
    recorded as is under its topic, as if the event itself had been given."""

    topic: str
    body: bytes

    @classmethod
    def of(cls, event: Event) -> EncodedEvent:
        import orjson

        return cls(topic_of(event), orjson.dumps(event))


@dataclass(frozen=True, slots=True)
class InstanceReceived(Event):
    """A DICOM instance stored by C-STORE (follows its MessageReceived): the identifiers the
    edge read from it and who sent it. A SOP Instance UID that came before with other bytes
    is a new version: its MessageReceived carries the flag `control_id_reused`."""

    calling_ae: str
    called_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    modality: str
    accession_number: str
    transfer_syntax: str
    size: int
    sha256: str
    institution_name: str = ""
    referring_facility: str = ""


@dataclass(frozen=True, slots=True)
class StudyCompleted(Event):
    """No instance of the study arrived for the quiet period: what it holds now (on the
    study's own stream; a study that receives more later completes again)."""

    study_instance_uid: str
    series: list[dict[str, Any]]
    instances: int
    size: int
    metadata: dict[str, Any]
    manifest: PayloadRef  # JSON list of the instances (SOP Instance UID, series, payload hash, size)
    position: int  # log position of the last InstanceReceived it covers


# DICOM (appended apart so the registry above stays as it was).
EVENT_TYPES.update({f"relais.{cls.__name__}": cls for cls in (InstanceReceived, StudyCompleted)})
__all__ += ["InstanceReceived", "StudyCompleted"]
# -- MSSanté (SMTP) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailReceived(Event):
    """A mail was accepted over SMTP: envelope, authenticated account, main headers
    (`X-MSS-*` included), its attachments and what became of its XDM archive."""

    envelope_from: str
    envelope_to: list[str]
    account: str
    tls_version: str
    message_id: str
    subject: str
    header_from: str
    mss_headers: dict[str, str]
    attachments: list[dict[str, Any]]
    xdm: str  # none | read | refused
    disposition_notification_to: str = ""


@dataclass(frozen=True, slots=True)
class DocumentSubmitted(Event):
    """A document carried by a mail (from its XDM archive or a plain attachment), stored
    content-addressed, with the sharing metadata the sender gave for it."""

    document_id: str
    source: str  # xdm | attachment
    filename: str
    payload: PayloadRef
    patient_id: str
    patient_id_authority: str
    class_code: str
    type_code: str
    author: str
    confidentiality: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MailIntegrationFailed(Event):
    """The mail was stored but its documents could not be integrated; `code` and `label`
    are what its MDN reports (XDM archive refused, INS missing or not matching...)."""

    code: str
    label: str
    detail: str


@dataclass(frozen=True, slots=True)
class MdnQueued(Event):
    """A disposition notification (RFC 8098) for this mail is in the outbox."""

    delivery_id: str
    recipient: str
    disposition: str  # processed | failed
    code: str
    payload: PayloadRef


EVENT_TYPES.update(
    {f"relais.{cls.__name__}": cls for cls in (MailReceived, DocumentSubmitted, MailIntegrationFailed, MdnQueued)}
)
