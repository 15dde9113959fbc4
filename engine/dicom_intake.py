"""DICOM intake: a spooled C-STORE file becomes a durable blob, a `Submission` and a status.

Runs on the engine's event loop; the blob is fsynced in a worker thread and the commit
that names it waits for that. Success (0x0000) only once the event committed.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from connectors.dicom import OUT_OF_RESOURCES, DicomServer, Refusal, StoreRequest
from connectors.dicom_association import HEAD_LIMIT
from engine.config import DicomListener
from engine.dicom_header import scan_header, scan_header_bytes
from engine.ingest import IngestUnavailable, Submission, Submitter, Verdict
from event_store import Event, PayloadRef
from event_store.blobs import BlobStore
from event_store.events import InstanceReceived

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_MISMATCH",
    "SUCCESS",
    "DicomIntake",
    "dicom_servers",
    "read_header",
]

log = structlog.get_logger("relais.dicom_intake")

SUCCESS = 0x0000
DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand

# What is read from each instance (the header only: reading stops before the pixels).
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "IssuerOfPatientID", "Modality", "AccessionNumber", "InstitutionName", "RequestingService",
    "StudyDate", "SeriesNumber",
]  # fmt: skip


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def read_header(path: Path, head: bytes | None = None, size: int = 0) -> dict[str, str]:
    """The identifying attributes of a DICOM file (InvalidDicomError and friends if unreadable),
    from its first bytes `head` when the caller has them."""
    found = scan_header(path) if head is None else scan_header_bytes(head, complete=len(head) >= size)
    if found is not None:
        return found
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    return {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS}


class DicomIntake:
    """The C-STORE handler of one DICOM listener."""

    def __init__(self, listener: DicomListener, ingestor: Submitter, blobs: BlobStore, inline_limit: int = 0) -> None:
        self.listener = listener
        self.ingestor = ingestor
        self.blobs = blobs
        # Instances up to this size (and up to HEAD_LIMIT, what is kept in memory while it
        # arrives) are stored in the database with their events rather than as blob files.
        self.inline_limit = min(inline_limit, HEAD_LIMIT)

    async def on_store(self, req: StoreRequest) -> int:
        """Make the spooled file a durable blob, commit its events, answer a DIMSE status."""
        try:
            header: dict[str, str] | None = read_header(req.path, req.head, req.size)
        except (InvalidDicomError, NotImplementedError, ValueError, KeyError, TypeError, EOFError, OSError):
            header = None
        verdict = _verdict(req, header)
        ref = PayloadRef(req.sha256, req.size, "application/dicom", inline=req.size <= self.inline_limit)
        synced: Future[None] | None = None
        if ref.inline:
            # Whole in memory already (head): its bytes go into the commit itself, one flush
            # (the WAL's) instead of three (the blob, its folder, the commit).
            req.path.unlink(missing_ok=True)
        else:
            try:  # made durable in a worker thread; the commit waits for it
                synced = self.blobs.place(req.path, req.sha256)
            except OSError as e:  # disk full, say: nothing was stored
                req.path.unlink(missing_ok=True)
                log.error("dicom_blob_failed", listener=self.listener.name, error=type(e).__name__)
                return OUT_OF_RESOURCES
        submission = self._submission(req, header or {}, verdict, ref, synced)
        try:
            async with asyncio.timeout(self.listener.store_timeout):
                receipt = await self.ingestor.submit(submission)
        except (IngestUnavailable, TimeoutError) as e:
            log.error("dicom_not_stored", listener=self.listener.name, error=str(e)[:120] or "store timeout")
            return OUT_OF_RESOURCES
        if receipt.duplicate:
            log.info("dicom_duplicate", listener=self.listener.name, message_id=str(receipt.message_id))
        elif receipt.flags:
            log.warning("dicom_new_version", listener=self.listener.name, message_id=str(receipt.message_id),
                        flags=list(receipt.flags))  # fmt: skip
        if receipt.verdict.status == "accepted":
            return SUCCESS
        return int(receipt.verdict.ack_code, 16)

    async def on_refusal(self, refusal: Refusal) -> None:
        """Keep a refused or aborted association as a rejected message: the PDU that caused
        it, who sent it, and the answer given (bad input is recorded like any other)."""
        submission = Submission(
            listener=self.listener.name, protocol="dicom", peer=refusal.peer, payload=refusal.evidence,
            content_type="application/octet-stream", sender=refusal.calling_ae, message_type="DICOM",
            trigger_event=refusal.answer if refusal.answer != "none" else "C-STORE",
            metadata={"calling_ae": refusal.calling_ae, "called_ae": refusal.called_ae, "refused": refusal.reason},
            verdict=Verdict("reject", refusal.answer, refusal.code, refusal.reason),
        )  # fmt: skip
        try:
            async with asyncio.timeout(self.listener.store_timeout):
                receipt = await self.ingestor.submit(submission)
        except (IngestUnavailable, TimeoutError) as e:
            log.error("dicom_refusal_not_stored", listener=self.listener.name, answer=refusal.answer,
                      error=str(e)[:120] or "store timeout")  # fmt: skip
            return
        log.warning("dicom_refused", listener=self.listener.name, message_id=str(receipt.message_id),
                    answer=refusal.answer, code=refusal.code)  # fmt: skip

    def _submission(
        self,
        req: StoreRequest,
        header: dict[str, str],
        verdict: Verdict,
        ref: PayloadRef,
        synced: Future[None] | None,
    ) -> Submission:
        accepted = verdict.status == "accepted"
        metadata: dict[str, Any] = {
            "calling_ae": req.calling_ae,
            "called_ae": req.called_ae,
            "sending_application": req.calling_ae,
            "sop_class_uid": header.get("SOPClassUID") or req.sop_class_uid,
            "sop_instance_uid": header.get("SOPInstanceUID") or req.sop_instance_uid,
            "study_instance_uid": header.get("StudyInstanceUID", ""),
            "series_instance_uid": header.get("SeriesInstanceUID", ""),
            "modality": header.get("Modality", ""),
            "accession_number": header.get("AccessionNumber", ""),
            "institution_name": header.get("InstitutionName", ""),
            "referring_facility": header.get("RequestingService", ""),
            "transfer_syntax": req.transfer_syntax,
        }
        if header.get("PatientID"):
            metadata["patient_identifiers"] = [
                {"id": header["PatientID"], "authority": header.get("IssuerOfPatientID", ""), "type": "PI"}
            ]
        events: list[Event] = []
        if accepted:
            events.append(
                InstanceReceived(
                    datetime.now(UTC).isoformat(timespec="microseconds"),
                    req.calling_ae,
                    req.called_ae,
                    metadata["sop_class_uid"],
                    metadata["sop_instance_uid"],
                    metadata["study_instance_uid"],
                    metadata["series_instance_uid"],
                    header.get("PatientID", ""),
                    header.get("IssuerOfPatientID", ""),
                    metadata["modality"],
                    metadata["accession_number"],
                    req.transfer_syntax,
                    ref.size,
                    ref.sha256,
                    metadata["institution_name"],
                    metadata["referring_facility"],
                )
            )
        return Submission(
            listener=self.listener.name,
            protocol="dicom",
            peer=req.peer,
            payload=req.head if ref.inline else b"",
            content_type="application/dicom",
            # SOP Instance UIDs are globally unique whoever sends them (a PACS resending what
            # the modality sent is the same instance): no sender in the key. Refusals have no
            # key, so a corrected resend is a plain new instance.
            sender="",
            control_id=metadata["sop_instance_uid"] if accepted else "",
            message_type="DICOM",
            trigger_event="C-STORE",
            metadata=metadata,
            verdict=verdict,
            events=events,
            stored_payload=None if ref.inline else ref,
            blob_synced=synced,
        )


def _verdict(req: StoreRequest, header: dict[str, str] | None) -> Verdict:
    uids = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    if header is None or not any(header[k] for k in uids):
        return Verdict("reject", f"{CANNOT_UNDERSTAND:04X}", "", "dataset cannot be read as DICOM")
    if any(header[k] and not _UID.fullmatch(header[k]) for k in uids):
        return Verdict("reject", f"{CANNOT_UNDERSTAND:04X}", "", "an identifying UID is not a UID")
    if not header["SOPClassUID"] or header["SOPClassUID"] != req.sop_class_uid:
        return Verdict("reject", f"{DATASET_MISMATCH:04X}", "", "SOP Class UID differs from the C-STORE request",
                       "(0008,0016)")  # fmt: skip
    if not header["SOPInstanceUID"] or header["SOPInstanceUID"] != req.sop_instance_uid:
        return Verdict("reject", f"{DATASET_MISMATCH:04X}", "", "SOP Instance UID differs from the C-STORE request",
                       "(0008,0018)")  # fmt: skip
    if not header["StudyInstanceUID"]:
        return Verdict("reject", f"{DATASET_MISMATCH:04X}", "", "Study Instance UID is missing", "(0020,000D)")
    return Verdict(ack_code=f"{SUCCESS:04X}")  # the DIMSE status, as HL7 keeps its ACK code


def dicom_servers(
    listeners: list[DicomListener],
    ingestor: Submitter,
    blobs: BlobStore,
    ssl_context_of: Any,
    inline_limit: int = 0,
    reuse_port: bool = False,
) -> list[DicomServer]:
    """The DICOM listeners of the config, each with its intake (not started)."""
    servers = []
    for listener in listeners:
        intake = DicomIntake(listener, ingestor, blobs, inline_limit)
        servers.append(DicomServer(
            name=listener.name,
            host=listener.host,
            port=listener.port,
            ae_title=listener.ae_title,
            handler=intake.on_store,
            on_refusal=intake.on_refusal,
            spool=blobs.spool,
            allowed_calling_aets=listener.allowed_calling_aets,
            allowed_peers=listener.allowed_peers,
            max_pdu=listener.max_pdu,
            max_associations=listener.max_associations,
            network_timeout=listener.network_timeout,
            ssl_context=ssl_context_of(listener.tls) if listener.tls else None,
            reuse_port=reuse_port,
        ))  # fmt: skip
    return servers
