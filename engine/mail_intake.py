"""MSSanté intake: what a mail accepted over SMTP becomes in the log. Recipients are checked
at RCPT, the mail is read (MIME, XDM archive, INS checks) and `250` is answered only once
`MessageReceived` + `MailReceived` + its `DocumentSubmitted` events are committed.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.mail import MailContent, read_mail
from connectors.xdm import INS_OIDS, XdmArchive, XdmRefused, read_xdm
from engine.config import SmtpListener
from engine.ingest import IngestUnavailable, Submission, Submitter, Verdict, uuid7
from engine.logs import name_process
from event_store import Event, PayloadRef
from event_store.events import DocumentSubmitted, MailIntegrationFailed, MailReceived
from event_store.store import payload_ref

__all__ = ["INTEGRATION_ERRORS", "MailIntake", "MailReading", "read_submission"]

log = structlog.get_logger("relais.mail")

PATIENT_DOMAIN = "patient.mssante.fr"
# What an MDN reports when a mail's documents could not be integrated (code -> label).
INTEGRATION_ERRORS = {
    "INS-MISSING": "INS absent : le patient n'est pas identifié par son INS",
    "INS-MISMATCH": "INS non concordant avec les traits d'identité ou le destinataire",
    "XDM-UNREADABLE": "Archive IHE_XDM.ZIP illisible ou refusée",
    "MAIL-UNREADABLE": "Message illisible : il est conservé mais ses documents ne sont pas intégrés",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class MailReading:
    """Everything read from one mail, ready to be submitted."""

    mail: MailContent
    events: list[Event] = field(default_factory=list)
    payloads: list[tuple[PayloadRef, bytes]] = field(default_factory=list)
    patient_ids: list[tuple[str, str]] = field(default_factory=list)  # (INS, authority OID)
    failure: tuple[str, str] | None = None  # (code, detail)


def _cda_identity(data: bytes) -> tuple[set[tuple[str, str]], str]:
    """INS identifiers and birth date of a CDA's recordTarget (best effort, never raises)."""
    import xml.etree.ElementTree as ET

    if b"<!DOCTYPE" in data[:4096].upper() or b"<!ENTITY" in data.upper():
        return set(), ""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return set(), ""
    ns = "{urn:hl7-org:v3}"
    target = root.find(f"{ns}recordTarget/{ns}patientRole")
    if target is None:
        return set(), ""
    ids = {(i.get("extension", ""), i.get("root", "")) for i in target.findall(f"{ns}id") if i.get("root") in INS_OIDS}
    birth = target.find(f"{ns}patient/{ns}birthTime")
    return ids, (birth.get("value", "")[:8] if birth is not None else "")


def _check_identity(archive: XdmArchive, recipients: list[str]) -> tuple[str, str] | None:
    """None when the archive's INS is present and consistent; else (code, detail)."""
    ins, oid = archive.patient_id, archive.patient_id_authority
    if not ins:
        ins, oid = next(((d.patient_id, d.patient_id_authority) for d in archive.documents if d.patient_id), ("", ""))
    if not ins or oid not in INS_OIDS:
        return "INS-MISSING", "the submission set has no patientId with an INS authority"
    for doc in archive.documents:
        if doc.patient_id and (doc.patient_id, doc.patient_id_authority) != (ins, oid):
            return "INS-MISMATCH", f"document {doc.entry_id} names another patient than the submission set"
    for rcpt in recipients:
        local, _, domain = rcpt.rpartition("@")
        if domain.lower() == PATIENT_DOMAIN and local != ins:
            return "INS-MISMATCH", "the patient mailbox is not the INS of the documents"
    birth = archive.source_patient_info.get("PID-7", "")[:8]
    for doc in archive.documents:
        if doc.mime_type not in ("text/xml", "application/xml", "application/hl7-v3+xml"):
            continue
        cda_ids, cda_birth = _cda_identity(doc.data)
        if cda_ids and (ins, oid) not in cda_ids:
            return "INS-MISMATCH", f"the CDA of document {doc.entry_id} carries another INS"
        if birth and cda_birth and birth != cda_birth:
            return "INS-MISMATCH", f"the CDA of document {doc.entry_id} has another birth date"
    return None


def read_submission(raw: bytes, recipients: list[str], inline_limit: int) -> MailReading:
    """Read a mail into its MailReceived and DocumentSubmitted events (pure, no I/O)."""
    now = _now()
    mail = read_mail(raw)
    reading = MailReading(mail)
    docs: list[DocumentSubmitted] = []
    xdm_state = "none"
    attachments_meta: list[dict[str, Any]] = []
    patient_mailbox = next(
        (r.rpartition("@")[0] for r in recipients if r.rpartition("@")[2].lower() == PATIENT_DOMAIN), ""
    )
    for att in mail.attachments:
        ref = payload_ref(att.data, att.content_type, inline_limit)
        attachments_meta.append(
            {"filename": att.filename, "content_type": att.content_type, "size": ref.size, "sha256": ref.sha256}
        )
        if att.filename.upper().endswith("IHE_XDM.ZIP") or att.filename.upper() == "IHE_XDM.ZIP":
            try:
                archive = read_xdm(att.data)
            except XdmRefused as e:
                xdm_state = "refused"
                reading.failure = ("XDM-UNREADABLE", f"{e.code}: {e.reason}")
                continue
            problem = _check_identity(archive, recipients)
            if problem is not None:
                xdm_state = "refused"
                reading.failure = problem
                continue
            xdm_state = "read"
            for d in archive.documents:
                ins = d.patient_id or archive.patient_id
                oid = d.patient_id_authority or archive.patient_id_authority
                if (ins, oid) not in reading.patient_ids:
                    reading.patient_ids.append((ins, oid))
                dref = payload_ref(d.data, d.mime_type, inline_limit)
                reading.payloads.append((dref, d.data))
                docs.append(
                    DocumentSubmitted(
                        now, str(uuid7()), "xdm", d.filename, dref, ins, oid, d.class_code, d.type_code,
                        d.author, d.confidentiality, {**d.metadata, "entry_id": d.entry_id},
                    )
                )  # fmt: skip
            continue
        # A plain attachment: a document with what the mail says about it.
        reading.payloads.append((ref, att.data))
        docs.append(
            DocumentSubmitted(
                now, str(uuid7()), "attachment", att.filename, ref, patient_mailbox,
                "1.2.250.1.213.1.4.8" if patient_mailbox else "", "", "", mail.header_from, "",
                {"subject": mail.subject, "x_mss_codecda": mail.mss_headers.get("X-MSS-CODECDA", "")},
            )
        )  # fmt: skip
    if reading.failure is None and xdm_state == "none" and mail.mss_headers.get("X-MSS-INS", "").upper() == "O":
        # The sender says the mail identifies the patient by INS, yet carries no XDM metadata.
        reading.failure = ("INS-MISSING", "X-MSS-INS: O but no IHE_XDM.ZIP gives the patient's INS")
    reading.events.append(
        MailReceived(
            now, "", list(recipients), "", "", mail.message_id, mail.subject, mail.header_from,
            mail.mss_headers, attachments_meta, xdm_state, mail.disposition_notification_to,
        )
    )  # fmt: skip
    reading.events.extend(docs)
    if reading.failure is not None:
        code, detail = reading.failure
        reading.events.append(MailIntegrationFailed(now, code, INTEGRATION_ERRORS[code], detail))
    return reading


def unreadable_mail(recipients: list[str], error: str) -> MailReading:
    """What is recorded when reading a mail failed: the raw mail and the failure."""
    now = _now()
    reading = MailReading(MailContent(problems=[f"reader failed: {error}"]))
    reading.failure = ("MAIL-UNREADABLE", f"the mail reader failed ({error})")
    reading.events = [
        MailReceived(now, "", list(recipients), "", "", "", "", "", {}, [], "none"),
        MailIntegrationFailed(now, "MAIL-UNREADABLE", INTEGRATION_ERRORS["MAIL-UNREADABLE"], reading.failure[1]),
    ]
    return reading


class MailIntake:
    """aiosmtpd handler of one SMTP listener: recipient checks, then submit and answer."""

    def __init__(self, listener: SmtpListener, ingestor: Submitter, inline_limit: int) -> None:
        self.listener = listener
        self.ingestor = ingestor
        self.inline_limit = inline_limit
        # Reading a mail (base64, zip, XML) is CPU work the event loop can hand to other
        # processes; it also keeps a hostile archive away from the process that commits.
        self.readers: ProcessPoolExecutor | None = None
        self.domains = {d.lower() for d in listener.domains}
        self.mailboxes = {m.lower() for m in listener.mailboxes}

    def start_readers(self) -> None:
        if self.listener.readers and self.readers is None:
            self.readers = ProcessPoolExecutor(
                self.listener.readers, mp_context=mp.get_context("spawn"), initializer=name_process,
                initargs=("relais-mailread",),
            )  # fmt: skip

    def stop_readers(self) -> None:
        if self.readers is not None:
            self.readers.shutdown(wait=True, cancel_futures=True)
            self.readers = None

    async def _read(self, raw: bytes, recipients: list[str]) -> MailReading:
        try:
            if self.readers is None:
                return read_submission(raw, recipients, self.inline_limit)
            return await asyncio.get_running_loop().run_in_executor(
                self.readers, read_submission, raw, recipients, self.inline_limit
            )
        except BrokenProcessPool:
            log.error("mail_reader_died", listener=self.listener.name)
            self.readers = None  # a fresh pool for the next mail; this one gets a 451
            self.start_readers()
            raise
        except Exception as e:
            # A mail our reader cannot handle is still kept (and its sender told by MDN).
            log.error("mail_unreadable", listener=self.listener.name, error=type(e).__name__)
            return unreadable_mail(recipients, type(e).__name__)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        local, _, domain = address.rpartition("@")
        if not local or domain.lower() not in self.domains:
            return "550 5.7.1 Relaying denied: this domain is not served here"
        if self.mailboxes and address.lower() not in self.mailboxes:
            return "550 5.1.1 Mailbox unknown"
        if len(envelope.rcpt_tos) >= 100:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def _submission(self, session: Session, envelope: Envelope, raw: bytes) -> Submission:
        recipients = list(envelope.rcpt_tos)
        reading = await self._read(raw, recipients)
        received = reading.events[0]
        assert isinstance(received, MailReceived)
        account = str(session.auth_data or "")
        ssl_object = (session.ssl or {}).get("ssl_object")
        tls_version = ssl_object.version() if ssl_object is not None else ""
        reading.events[0] = MailReceived(
            received.recorded_at, envelope.mail_from or "", recipients, account, tls_version or "",
            received.message_id, received.subject, received.header_from, received.mss_headers,
            received.attachments, received.xdm, received.disposition_notification_to,
        )  # fmt: skip
        mail = reading.mail
        metadata: dict[str, Any] = {
            "mail_from": envelope.mail_from or "",
            "rcpt_to": recipients,
            "account": account,
            "message_id": mail.message_id,
            "documents": sum(isinstance(e, DocumentSubmitted) for e in reading.events),
            "patient_identifiers": [{"id": i, "type": "INS", "authority_oid": o} for i, o in reading.patient_ids],
        }
        if reading.failure:
            metadata["integration_error"] = reading.failure[0]
        if mail.problems:
            metadata["mime_problems"] = mail.problems[:20]
        return Submission(
            listener=self.listener.name,
            protocol="smtp",
            peer=_peer(session),
            payload=raw,
            content_type="message/rfc822",
            sender=envelope.mail_from or "",
            control_id=mail.message_id,
            message_type="MAIL",
            metadata=metadata,
            events=reading.events,
            payloads=reading.payloads,
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        submission = await self._submission(session, envelope, raw)
        try:
            receipt = await self.ingestor.submit(submission)
        except IngestUnavailable:
            log.error("mail_not_stored", listener=self.listener.name)
            return "451 4.3.0 Mail not stored, please try again later"
        log.info("mail_received", listener=self.listener.name, message_id=str(receipt.message_id),
                 duplicate=receipt.duplicate, documents=submission.metadata["documents"],
                 integration_error=submission.metadata.get("integration_error", ""))  # fmt: skip
        return f"250 2.0.0 OK {receipt.message_id}"

    async def handle_oversized(self, server: SMTP, session: Session, envelope: Envelope, head: bytes, size: int) -> str:
        """Record what can be recorded of a mail over the size limit (its first 64 KB)."""
        limit = self.listener.max_message_bytes
        reason = f"mail of {size} bytes or more exceeds the {limit} bytes limit"
        submission = Submission(
            listener=self.listener.name, protocol="smtp", peer=_peer(session), payload=head,
            content_type="message/rfc822", sender=envelope.mail_from or "", message_type="MAIL",
            metadata={"mail_from": envelope.mail_from or "", "rcpt_to": list(envelope.rcpt_tos),
                      "account": str(session.auth_data or ""), "truncated": True, "size_at_least": size},
            verdict=Verdict("reject", "552", "5.3.4", reason),
        )  # fmt: skip
        try:
            receipt = await self.ingestor.submit(submission)
            log.warning("mail_too_big", listener=self.listener.name, message_id=str(receipt.message_id), size=size)
        except IngestUnavailable:
            log.error("mail_refusal_not_recorded", listener=self.listener.name)
        return f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} bytes)"

    async def handle_cut_off(self, session: Session, envelope: Envelope, partial: bytes, size: int) -> None:
        """A mail whose DATA stopped before `<CRLF>.<CRLF>` (connection closed or idle):
        recorded as refused with the bytes that came; the client never got a 250."""
        submission = Submission(
            listener=self.listener.name, protocol="smtp", peer=_peer(session), payload=partial,
            content_type="message/rfc822", sender=envelope.mail_from or "", message_type="MAIL",
            metadata={"mail_from": envelope.mail_from or "", "rcpt_to": list(envelope.rcpt_tos),
                      "account": str(session.auth_data or ""), "truncated": True, "size_at_least": size},
            verdict=Verdict("reject", "", "cut-off", f"the connection ended after {size} bytes of DATA, "
                            "before its end (<CRLF>.<CRLF>)"),
        )  # fmt: skip
        try:
            receipt = await self.ingestor.submit(submission)
            log.warning("mail_cut_off", listener=self.listener.name, message_id=str(receipt.message_id), size=size)
        except IngestUnavailable:
            log.error("mail_cut_off_not_recorded", listener=self.listener.name)

    async def handle_exception(self, error: Exception) -> str:
        # Never tell the client what went wrong inside: log the kind, answer "try later".
        if type(error).__name__ == "TLSSetupException":  # a client that cannot do TLS 1.2+
            log.warning("smtp_tls_refused", listener=self.listener.name, detail=str(error)[:200])
            return "454 4.7.0 TLS not available"
        log.error(
            # the kind only: an exception's text may quote the mail (patient data)
            "smtp_session_error",
            listener=self.listener.name,
            error=type(error).__name__,
        )
        return "451 4.3.0 Temporary failure, please try again later"


def _peer(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")
