"""HL7 v2 intake: from one received message to its durable receipt and its ACK bytes.

Shared by every transport that carries ER7 (MLLP now, HTTP later): decode by MSH-18,
read the metadata with the ER7 reader, apply the listener's rules, wait for the group
commit, answer per the acknowledgement mode (original AA/AE/AR, enhanced CA/CE/CR).
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from connectors.mllp import FrameAnswer
from engine.ack import build_ack
from engine.config import MllpListener
from engine.er7 import Er7Error, Er7Message
from engine.ingest import IngestUnavailable, Receipt, Submission, Submitter, Verdict
from event_store import Event
from event_store.events import NotRouted

__all__ = ["Hl7Intake", "decode_hl7", "read_identifiers", "read_metadata"]

log = structlog.get_logger("relais.hl7")

CONTENT_TYPE = "application/hl7-v2"

_IDENTITY_ATTRIBUTES = frozenset({"HOMA", "FICT", "DOUT"})  # PAM France table 0445 attributes

_CHARSETS = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    # HL7 table 0211 names ISO 8859 parts 1-9 and 15 (there is no 8859-12 codec at all)
    **{f"8859/{n}": f"iso-8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}


def _charset_field(raw: bytes) -> str:
    """MSH-18 read from the raw bytes (delimiters are ASCII in every HL7 charset)."""
    raw = raw.lstrip(b"\xef\xbb\xbf\r\n \t\x00")  # the junk Er7Message.parse skips too
    end = raw.find(b"\r")
    msh = raw[: end if end >= 0 else len(raw)].split(b"\n", 1)[0]
    if not msh.startswith(b"MSH") or len(msh) < 4:
        return ""
    fields = msh.split(msh[3:4])
    # fields[0]='MSH', fields[1]=MSH-2, so MSH-n is fields[n-1]
    value = fields[17] if len(fields) > 17 else b""
    rep = msh[5:6] or b"~"
    return value.split(rep, 1)[0].decode("latin-1").strip()


def decode_hl7(raw: bytes, default_charset: str) -> tuple[str, str, list[str]]:
    """(text, codec used, flags) following MSH-18, else UTF-8, else the default charset."""
    declared = _charset_field(raw)
    flags: list[str] = []
    codec = _CHARSETS.get(declared.upper()) if declared else None
    if codec is None:
        if declared:
            flags.append("unknown_charset")
        try:
            return raw.decode("utf-8"), "utf-8", flags
        except UnicodeDecodeError:
            codec = default_charset
    try:
        return raw.decode(codec), codec, flags
    except UnicodeDecodeError:
        flags.append("charset_errors")
        return raw.decode(codec, errors="replace"), codec, flags


def read_identifiers(msg: Er7Message, segment: str, field: int) -> list[dict[str, str]]:
    """The CX identifiers of a field (PID-3, MRG-1): id, type, authority namespace and OID."""
    out = []
    for rep in msg.repetitions(segment, field):
        comps = msg.components(rep)
        value = comps[0][0]
        if not value:
            continue
        authority = comps[3] if len(comps) > 3 else [""]
        out.append(
            {
                "id": value,
                "type": comps[4][0] if len(comps) > 4 else "",
                "authority": authority[0],
                "authority_oid": authority[1] if len(authority) > 1 else "",
            }
        )
    return out


def read_metadata(msg: Er7Message) -> dict[str, Any]:
    """The fields the engine keeps about an HL7 message (no names: identifiers only)."""
    v = msg.value
    meta: dict[str, Any] = {
        "message_type": v("MSH", 9, 1),
        "trigger_event": v("MSH", 9, 2),
        "structure": v("MSH", 9, 3),
        "control_id": v("MSH", 10),
        "processing_id": v("MSH", 11),
        "version": v("MSH", 12),
        "sending_application": v("MSH", 3),
        "sending_facility": v("MSH", 4),
        "receiving_application": v("MSH", 5),
        "receiving_facility": v("MSH", 6),
        "message_datetime": v("MSH", 7),
        "accept_ack_type": v("MSH", 15),
        "application_ack_type": v("MSH", 16),
        "charset": v("MSH", 18),
        "segments": msg.segment_ids(),
    }
    if msg.has_segment("EVN"):
        meta["event_time"] = v("EVN", 6) or v("EVN", 2)
    if msg.has_segment("PID"):
        meta["patient_identifiers"] = read_identifiers(msg, "PID", 3)
        # PID-32 repeats: one status (VALI, PROV...) and attributes (HOMA, FICT, DOUT) in any order.
        codes = [msg.components(r)[0][0] for r in msg.repetitions("PID", 32)]
        meta["identity_reliability"] = next((c for c in codes if c not in _IDENTITY_ATTRIBUTES), "")
        meta["identity_attributes"] = [c for c in codes if c in _IDENTITY_ATTRIBUTES]
    if msg.has_segment("MRG"):
        meta["merged_identifiers"] = read_identifiers(msg, "MRG", 1)
    if msg.has_segment("PV1"):
        meta["visit_number"] = v("PV1", 19)
        meta["patient_class"] = v("PV1", 2)
    if msg.has_segment("ZBE"):
        meta["movement_id"] = v("ZBE", 1)
        meta["movement_action"] = v("ZBE", 4)
    return meta


@dataclass(frozen=True, slots=True)
class _Mode:
    enhanced: bool
    accept_ack: str  # AL | NE | ER | SU

    def code(self, status: str) -> str:
        if self.enhanced:
            return {"accepted": "CA", "error": "CE", "reject": "CR"}[status]
        return {"accepted": "AA", "error": "AE", "reject": "AR"}[status]

    def wants_answer(self, status: str) -> bool:
        if not self.enhanced or self.accept_ack in ("", "AL"):
            return True
        if self.accept_ack == "NE":
            return False
        if self.accept_ack == "ER":
            return status != "accepted"
        if self.accept_ack == "SU":
            return status == "accepted"
        return True


_ORIGINAL = _Mode(False, "")


class Hl7Intake:
    """Turns received ER7 bytes into a durable submission and the ACK to send back."""

    def __init__(
        self,
        listener: MllpListener,
        ingestor: Submitter,
        protocol: str = "mllp",
        decisions: Callable[[uuid.UUID], Awaitable[Event | None]] | None = None,
    ) -> None:
        self.listener = listener
        self.ingestor = ingestor
        self.protocol = protocol
        self.decisions = decisions  # the router's decision per message, for application ACKs
        self._senders = listener.allowed_senders

    async def handle(self, raw: bytes, peer: str) -> bytes | FrameAnswer | None:
        """The encoded ACK for one message, or None when no answer is due; in enhanced mode
        with MSH-16 valued, the application ACK follows once the message is routed."""
        text, codec, flags = decode_hl7(raw, self.listener.default_charset)
        msg: Er7Message | None
        try:
            msg = parsed = Er7Message.parse(text)
        except Er7Error as e:
            msg = None
            meta: dict[str, Any] = {"unreadable": str(e)}
            mode = _ORIGINAL
            verdict = Verdict("reject", "AR", "100", f"not an HL7 v2 message: {e}", "MSH")
        else:
            meta = read_metadata(parsed)
            mode = _mode_of(meta)
            verdict = self._check(parsed, meta, mode)
            if verdict.status == "accepted" and self.listener.validation == "strict":
                verdict = await asyncio.to_thread(_strict_verdict, text, mode)
        meta["decoded_as"] = codec
        if flags:
            meta["flags"] = flags
        submission = Submission(
            listener=self.listener.name,
            protocol=self.protocol,
            peer=peer,
            payload=raw,
            content_type=CONTENT_TYPE,
            sender=_sender_of(meta),
            control_id=meta.get("control_id", ""),
            message_type=meta.get("message_type", ""),
            trigger_event=meta.get("trigger_event", ""),
            metadata=meta,
            verdict=verdict,
        )
        try:
            receipt = await self.ingestor.submit(submission)
        except IngestUnavailable:
            log.error("message_not_stored", listener=self.listener.name, peer=peer,
                      control_id=submission.control_id)  # fmt: skip
            failed = Verdict("reject", mode.code("reject"), "207", "message not stored; resend later")
            return self._encode(msg, failed, "", _now_iso(), codec) if mode.wants_answer("reject") else None
        log.info(
            "message_received",
            message_id=str(receipt.message_id),
            listener=self.listener.name,
            type=f"{submission.message_type}^{submission.trigger_event}",
            control_id=submission.control_id,
            status=receipt.verdict.status,
            duplicate=receipt.duplicate,
        )
        if meta.get("message_type") == "ACK":
            return None  # never acknowledge an acknowledgement
        commit_ack = (
            self._encode(msg, receipt.verdict, _ack_control_id(receipt), receipt.received_at, codec)
            if mode.wants_answer(receipt.verdict.status)
            else None
        )
        app_ack = meta.get("application_ack_type", "").upper()
        if (
            mode.enhanced and app_ack in ("AL", "ER", "SU") and receipt.verdict.status == "accepted"
        ):  # a resend gets the application ACK again too (it may be the one that was lost)
            return FrameAnswer(commit_ack, self._application_ack(msg, receipt, app_ack, codec))
        return commit_ack

    async def _application_ack(self, msg: Er7Message | None, receipt: Receipt, wanted: str, codec: str) -> bytes | None:
        """AA once routed (or at once when routing is off), AE when no channel took it."""
        decision = await self.decisions(receipt.message_id) if self.decisions else None
        if self.decisions is not None and decision is None:
            return None  # no decision in time: the sender's own timeout applies
        if isinstance(decision, NotRouted):
            reason = f"not routed: {decision.reason}"
            verdict = Verdict("error", "AE", "207", reason)
        else:
            verdict = Verdict("accepted", "AA")
        if (wanted == "ER" and verdict.ack_code == "AA") or (wanted == "SU" and verdict.ack_code != "AA"):
            return None
        control = f"A{receipt.message_id.hex[:19].upper()}"
        return self._encode(msg, verdict, control, receipt.received_at, codec)

    async def truncated(self, partial: bytes, peer: str, reason: str) -> None:
        """Keep the bytes of a frame the sender never finished, as a rejected message."""
        await self._record_unreadable(partial, peer, reason)

    async def refused_body(self, partial: bytes, peer: str, reason: str) -> Receipt | None:
        """Keep what came of a body refused for its size or time (HTTP), as a rejected
        message; its receipt, None if it could not be stored."""
        return await self._record_unreadable(partial, peer, reason)

    async def oversized(self, prefix: bytes, peer: str) -> bytes | None:
        """Record the first `max_frame_bytes` of an oversized frame and answer AR."""
        reason = f"frame larger than {self.listener.max_frame_bytes} bytes"
        receipt = await self._record_unreadable(prefix, peer, reason)
        head = prefix[: prefix.find(b"\r")] if b"\r" in prefix[:65536] else prefix[:4096]
        text, codec, _ = decode_hl7(head, self.listener.default_charset)
        try:
            msg: Er7Message | None = Er7Message.parse(text)
        except Er7Error:
            msg = None
        verdict = Verdict("reject", "AR", "100", reason)
        if receipt is None:
            return self._encode(msg, verdict, "", _now_iso(), codec)
        return self._encode(msg, verdict, _ack_control_id(receipt), receipt.received_at, codec)

    async def _record_unreadable(self, raw: bytes, peer: str, reason: str) -> Receipt | None:
        submission = Submission(
            listener=self.listener.name, protocol=self.protocol, peer=peer, payload=raw,
            content_type=CONTENT_TYPE, metadata={"unreadable": reason},
            verdict=Verdict("reject", "AR", "100", reason),
        )  # fmt: skip
        try:
            receipt = await self.ingestor.submit(submission)
        except IngestUnavailable:
            log.error("unreadable_input_not_stored", listener=self.listener.name, peer=peer, size=len(raw))
            return None
        log.warning("unreadable_input", message_id=str(receipt.message_id), listener=self.listener.name,
                    reason=reason, size=len(raw))  # fmt: skip
        return receipt

    # -- rules ---------------------------------------------------------------------------

    def _check(self, msg: Er7Message, meta: dict[str, Any], mode: _Mode) -> Verdict:
        def reject(error: str, reason: str, location: str) -> Verdict:
            return Verdict("reject", mode.code("reject"), error, reason, location)

        def error(err: str, reason: str, location: str) -> Verdict:
            return Verdict("error", mode.code("error"), err, reason, location)

        if not meta["message_type"]:
            return reject("101", "MSH-9 message type is missing", "MSH-9")
        if not meta["control_id"]:
            return reject("101", "MSH-10 message control ID is missing", "MSH-10")
        version = meta["version"]
        if version not in self.listener.accepted_versions:
            return reject("203", f"HL7 version {version!r} is not accepted on this listener", "MSH-12")
        if self._senders and not any(
            fnmatch.fnmatchcase(f"{meta['sending_application']}|{meta['sending_facility']}", pattern)
            for pattern in self._senders
        ):
            return reject("207", "sending application/facility is not allowed on this listener", "MSH-3")
        for path in self.listener.required_fields:
            if not msg.get(path):
                return error("101", f"required field {path} is empty", path)
        for path in self.listener.forbidden_fields:
            if msg.get(path):
                return error("102", f"field {path} must be empty on this listener", path)
        return Verdict("accepted", mode.code("accepted"))

    def _encode(self, msg: Er7Message | None, verdict: Verdict, control_id: str, when: str, codec: str) -> bytes:
        text = build_ack(
            msg, code=verdict.ack_code, control_id=control_id, received_at=when,
            error_code=verdict.error_code, reason=verdict.reason, location=verdict.location,
        )  # fmt: skip
        return text.encode(codec, errors="replace")


def _mode_of(meta: dict[str, Any]) -> _Mode:
    accept, app = meta["accept_ack_type"], meta["application_ack_type"]
    if accept or app:
        return _Mode(True, accept.upper())
    return _ORIGINAL


def _ack_control_id(receipt: Receipt) -> str:
    return f"R{receipt.message_id.hex[:19].upper()}"


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="microseconds")


def _strict_verdict(text: str, mode: _Mode) -> Verdict:
    """hl7apy's strict validation against the HL7 structures (costly: ~30 ms a message)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT)
        parsed.validate()
    except HL7apyException as e:
        detail = str(e)
        missing = re.search(r"Missing required child \w+\.(\w+)", detail)
        code = "101" if missing else "102" if "datatype" in detail.lower() else "100"
        location = missing.group(1).replace("_", "-") if missing else ""
        return Verdict("error", mode.code("error"), code, f"strict validation: {detail}"[:300], location)
    except ValueError as e:  # hl7apy raises plain ValueError for badly formatted values
        return Verdict("error", mode.code("error"), "102", f"strict validation: bad value: {e}"[:300], "")
    return Verdict("accepted", mode.code("accepted"))


def _sender_of(meta: dict[str, Any]) -> str:
    """'APP|FACILITY' from MSH-3.1/MSH-4.1; '' when the message named no sender at all."""
    app, fac = meta.get("sending_application", ""), meta.get("sending_facility", "")
    return f"{app}|{fac}" if app or fac else ""
