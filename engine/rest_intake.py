"""REST intake: a submitted document set or telemedicine request, from the client's JSON
(documents base64 inline or as multipart parts) to a `Submission` and its problems.

The message's payload is the request in canonical form (sorted JSON, each document replaced
by its SHA-256 and size): the same submission gives the same bytes however it was encoded
(base64 or multipart with any boundary), so an `Idempotency-Key` resend is recognised.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from engine.ingest import Submission, Verdict
from event_store.events import SubmissionAccepted
from event_store.store import payload_ref

__all__ = [
    "FieldError",
    "InvalidSubmission",
    "SubmissionBody",
    "build_submission",
    "parse_submission",
    "rejected_submission",
]

INS_OIDS = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR-TEST",
    "1.2.250.1.213.1.4.11": "INS-NIR-DEMO",
}


BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"


KEY_REUSED = Verdict("reject", "422", "", "Idempotency-Key already used for another submission", "Idempotency-Key")


def ins_key(first13: str) -> str:
    """The NIR control key: 97 - (number mod 97), Corsica's 2A/2B counted as 19/18."""
    digits = first13[:5] + {"2A": "19", "2B": "18"}.get(first13[5:7], first13[5:7]) + first13[7:]
    return f"{97 - int(digits) % 97:02d}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Patient(_Model):
    """The patient by identifiers only: the INS (qualified identity) and/or a local IPP."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["ins"]}, {"required": ["local_id"]}]})

    ins: str = Field(
        "",
        pattern=r"^[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{8}$",
        description="INS matricule (NIR or NIA, 15 characters, Corsica 2A/2B) with its control key",
        json_schema_extra={"format": "ins"},
    )
    ins_oid: Literal["1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"] = (
        "1.2.250.1.213.1.4.8"
    )
    local_id: str = Field("", min_length=1, max_length=64, description="IPP in the sender's domain")
    local_authority: str = Field("", max_length=128, description="OID of the IPP's assigning authority")

    @field_validator("ins")
    @classmethod
    def _ins_key(cls, v: str) -> str:
        if v and ins_key(v[:13]) != v[13:]:
            raise ValueError("the INS control key (last 2 digits) does not match: mistyped?")
        return v


class Professional(_Model):
    """A health professional by RPPS number (11 digits) or ADELI (9)."""

    rpps: str = Field(pattern=r"^([0-9]{11}|[0-9]{9})$")
    name: str = Field("", max_length=200)
    organisation: str = Field("", max_length=64, description="FINESS of the professional's structure")


class DocumentIn(_Model):
    """One document: its bytes base64 in `content`, or in the multipart part named `part`."""

    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", min_length=3, max_length=127, pattern=r"^[\w.+-]+/[\w.+-]+")
    content: str = Field("", pattern=BASE64, description="base64 (RFC 4648) of the document")
    part: str = Field("", min_length=1, max_length=100, description="multipart only: the part holding the bytes")
    type_code: str = Field("", max_length=32, description="LOINC document type (11502-2 lab report...)")
    title: str = Field("", max_length=300)
    confidentiality: Literal["N", "R", "V"] = "N"


class DocumentSubmission(_Model):
    kind: Literal["document"]
    patient: Patient
    author: Professional | None = None
    author_institution: str = Field("", max_length=64, description="FINESS of the producing structure")
    documents: list[DocumentIn] = Field(min_length=1, max_length=100)


class TelemedicineRequest(_Model):
    kind: Literal["telemedicine"]
    requester: Professional
    expert: Professional
    patient: Patient
    reason: str = Field(min_length=1, max_length=2000)
    urgency: Literal["routine", "urgent"] = "routine"
    documents: list[DocumentIn] = Field(default_factory=list, max_length=100)


SubmissionBody = Annotated[DocumentSubmission | TelemedicineRequest, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[DocumentSubmission | TelemedicineRequest] = TypeAdapter(SubmissionBody)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class InvalidSubmission(Exception):
    """The request cannot be accepted; `status` is the HTTP answer, `errors` name the fields."""

    def __init__(self, status: int, title: str, errors: list[FieldError]) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.errors = errors


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("document", "telemedicine") or out:  # the union's tag is not a field
            out += f".{part}" if out else str(part)
    return out or "body"


def parse_submission(
    body: bytes, parts: dict[str, bytes] | None = None
) -> tuple[DocumentSubmission | TelemedicineRequest, list[bytes]]:
    """The validated request and its documents' bytes, in order; InvalidSubmission if not."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidSubmission(400, "body is not valid JSON", [FieldError("body", str(e)[:200])]) from None
    try:
        request = _ADAPTER.validate_python(raw)
    except ValidationError as e:
        errors = [
            FieldError("kind" if err["type"].startswith("union_tag") else _field_path(err["loc"]), err["msg"])
            for err in e.errors(include_url=False)[:20]
        ]
        raise InvalidSubmission(422, "submission does not match the schema", errors) from None
    contents: list[bytes] = []
    errors = []
    if not request.patient.ins and not request.patient.local_id:
        errors.append(FieldError("patient", "identify the patient by 'ins' and/or 'local_id'"))
    for i, doc in enumerate(request.documents):
        where = f"documents[{i}]"
        if bool(doc.content) == bool(doc.part):
            errors.append(FieldError(where, "give exactly one of 'content' (base64) or 'part' (multipart)"))
            continue
        if doc.content:
            try:
                contents.append(base64.b64decode(doc.content, validate=True))
            except (binascii.Error, ValueError):
                errors.append(FieldError(f"{where}.content", "not valid base64"))
            continue
        if parts is None or doc.part not in parts:
            errors.append(FieldError(f"{where}.part", f"no multipart part named {doc.part!r}"))
            continue
        contents.append(parts[doc.part])
    if errors:
        raise InvalidSubmission(422, "documents cannot be read", errors)
    return request, contents


def _identifiers(patient: Patient) -> list[dict[str, str]]:
    """The patient identifiers in the form HL7 intake uses, so route filters read both alike."""
    out = []
    if patient.ins:
        authority = INS_OIDS[patient.ins_oid]
        out.append(
            {"id": patient.ins, "type": "INS", "authority": f"ASIP-SANTE-{authority}", "authority_oid": patient.ins_oid}
        )
    if patient.local_id:
        out.append({"id": patient.local_id, "type": "PI", "authority": "", "authority_oid": patient.local_authority})
    return out


def build_submission(
    request: DocumentSubmission | TelemedicineRequest,
    contents: list[bytes],
    *,
    listener: str,
    peer: str,
    client: str,
    sender: str,
    idempotency_key: str,
    inline_limit: int,
) -> Submission:
    """The accepted submission: canonical request as payload, documents stored by hash."""
    refs = [
        payload_ref(data, doc.content_type, inline_limit) for doc, data in zip(request.documents, contents, strict=True)
    ]
    canonical = request.model_dump(mode="json")
    for entry, ref in zip(canonical["documents"], refs, strict=True):
        entry.pop("content", None)
        entry.pop("part", None)
        entry["sha256"], entry["size"] = ref.sha256, ref.size
    payload = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    metadata: dict[str, Any] = {
        "kind": request.kind,
        "client": client,
        "idempotency_key": idempotency_key,
        "patient_identifiers": _identifiers(request.patient),
        "document_types": [doc.type_code for doc in request.documents if doc.type_code],
        "documents": len(refs),
    }
    details = {k: v for k, v in canonical.items() if k not in ("kind", "documents")}
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    event = SubmissionAccepted(now, request.kind, client, refs, details)
    return Submission(
        listener=listener,
        protocol="rest",
        peer=peer,
        payload=payload,
        content_type="application/json",
        sender=sender,
        control_id=idempotency_key,
        message_type=request.kind,
        metadata=metadata,
        verdict=Verdict("accepted", "202"),
        reused_key_verdict=KEY_REUSED,
        events=[event],
        payloads=list(zip(refs, contents, strict=True)),
    )


def rejected_submission(
    body: bytes,
    content_type: str,
    problem: InvalidSubmission,
    *,
    listener: str,
    peer: str,
    client: str,
    idempotency_key: str,
) -> Submission:
    """What was refused, kept as a rejected message (without the key: a corrected resend
    under the same Idempotency-Key is then a new submission, not a conflict)."""
    first = problem.errors[0] if problem.errors else FieldError("body", "")
    return Submission(
        listener=listener,
        protocol="rest",
        peer=peer,
        payload=body,
        content_type=content_type or "application/octet-stream",
        sender="",
        metadata={
            "client": client,
            "idempotency_key": idempotency_key,
            "errors": [{"field": e.field, "message": e.message} for e in problem.errors],
        },
        verdict=Verdict("reject", str(problem.status), "", f"{problem.title}: {first.message}"[:300], first.field),
    )
