"""Outbound DICOM (C-STORE SCU): send a study, or one instance, to another node.

A study delivery's payload is its manifest (JSON list of instances with their payload
hashes); the instances are read from the store by `payload_loader`, which the engine sets.
One association per delivery, TCP_NODELAY on its socket, optional patient-ID rewrite.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import Callable
from typing import Any

import structlog
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure
from connectors.dicom import no_delay

__all__ = ["MANIFEST_TYPE", "DicomDestination"]

log = structlog.get_logger("relais.out.dicom")

MANIFEST_TYPE = "application/x-relais-study-manifest+json"
# Success and the warnings of PS3.4 B.2.3 (coercion, elements discarded, SOP class mismatch).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DicomDestination:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        called_ae: str,
        *,
        calling_ae: str = "RELAIS",
        timeout: float = 30.0,
        max_pdu: int = 1024 * 1024,
        patient_id_map: dict[str, str] | None = None,
        issuer_of_patient_id: str | None = None,
        unmapped_patient: str = "keep",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.called_ae = called_ae
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.max_pdu = max_pdu
        self.patient_id_map = dict(patient_id_map or {})
        self.issuer = issuer_of_patient_id
        self.unmapped_patient = unmapped_patient
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        # Set by the engine: the stored bytes of a payload hash (checked against it).
        self.payload_loader: Callable[[str], bytes] | None = None

    @property
    def rewrites(self) -> bool:
        return bool(self.patient_id_map) or self.issuer is not None

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        if delivery.content_type == MANIFEST_TYPE:
            manifest = json.loads(delivery.payload)
            hashes = [item["sha256"] for item in manifest]
        elif delivery.content_type == "application/dicom":
            hashes = []
        else:
            raise PermanentFailure(f"a DICOM destination cannot send {delivery.content_type}")
        if hashes and self.payload_loader is None:
            raise TemporaryFailure("no payload loader: the destination is not attached to a store")
        sent = await asyncio.to_thread(self._send, delivery, hashes)
        return DeliveryOutcome(detail=f"C-STORE {sent} instances")

    def _load(self, delivery: Delivery, sha256: str | None, header_only: bool = False) -> Dataset:
        """One instance of the delivery (the payload itself when it is a single instance)."""
        raw = delivery.payload if sha256 is None else self.payload_loader(sha256)  # type: ignore[misc]
        ds = dcmread(io.BytesIO(raw), stop_before_pixels=header_only)
        if self.rewrites:
            self._rewrite(ds)
        return ds

    def _rewrite(self, ds: Dataset) -> None:
        """The patient identifier of the receiver's domain (never logged)."""
        current = str(ds.get("PatientID", "") or "")
        if self.patient_id_map:
            new = self.patient_id_map.get(current)
            if new is None:
                if self.unmapped_patient == "fail":
                    raise PermanentFailure("no patient_id_map entry for the study's patient ID")
            else:
                ds.PatientID = new
        if self.issuer is not None:
            ds.IssuerOfPatientID = self.issuer

    def _send(self, delivery: Delivery, hashes: list[str]) -> int:
        keys: list[str | None] = list(hashes) or [None]
        # A study may be large: one instance in memory at a time, read once for the
        # presentation contexts (and the patient mapping, checked before anything is sent)
        # and once to send it.
        contexts = set()
        for key in keys:
            ds = self._load(delivery, key, header_only=True)
            contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        if len(contexts) > 128:
            raise PermanentFailure("more than 128 SOP class / transfer syntax pairs in one study")
        ae = AE(ae_title=self.calling_ae)
        ae.maximum_pdu_size = self.max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, syntax)
        tls = (self.ssl_context, self.server_hostname) if self.ssl_context else None
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, _no_delay_on_open)]
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls, evt_handlers=handlers)
        if not assoc.is_established:
            raise TemporaryFailure(f"association with {self.called_ae} not established")
        try:
            for key in keys:
                status = assoc.send_c_store(self._load(delivery, key))
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in STORED:
                    continue
                if code == -1:
                    raise TemporaryFailure("no C-STORE response (timeout or connection lost)")
                if 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF:
                    raise PermanentFailure(f"C-STORE refused with status 0x{code:04X}")
                raise TemporaryFailure(f"C-STORE failed with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return len(keys)

    async def close(self) -> None:
        """No connection is kept between deliveries."""


def _no_delay_on_open(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        no_delay(sock)
