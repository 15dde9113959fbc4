"""The DICOM upper layer of a storage SCP (PS3.8, PS3.7) for one association on asyncio streams.

pynetdicom decodes and encodes the association PDUs and negotiates the presentation contexts;
P-DATA is read here, so each dataset goes into its spool file (connectors/spool.py) as it
arrives (PS3.10 file meta first) and is hashed on the way, with no thread per association.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from connectors.dimse import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    INVALID_PARAMETER,
    P_DATA,
    PDU_HEADER,
    PDV_HEADER,
    US,
    ProtocolError,
    decode_command,
    encode_command,
    file_meta,
    p_data_pdus,
    ui,
    ui_value,
    us,
)
from connectors.spool import WRITEBACK_CHUNK, SpoolFiles, start_writeback

__all__ = [
    "HEAD_LIMIT",
    "IMPLEMENTATION_CLASS_UID",
    "OUT_OF_RESOURCES",
    "AssociationRules",
    "ProtocolError",
    "Refusal",
    "RefusalHandler",
    "StoreHandler",
    "StoreRequest",
    "serve_association",
]

log = structlog.get_logger("relais.dicom")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
UNRECOGNIZED_OPERATION = 0x0211

_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _RELEASE_RQ, _RELEASE_RP, _ABORT = 1, 2, 3, 5, 6, 7
_C_STORE_RQ, _C_ECHO_RQ = 0x0001, 0x0030
_NO_DATASET = 0x0101
# A-ABORT reasons (PS3.8 9.3.8) when the service provider aborts.
_UNEXPECTED_PDU, _UNRECOGNIZED_PDU = 0x02, 0x01
_MAX_ASSOCIATE_RQ = 256 * 1024  # ~128 proposed contexts take ~15 KB
HEAD_LIMIT = 256 * 1024
EVIDENCE_LIMIT = 64 * 1024  # bytes of the offending PDU kept with a refusal


_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One received C-STORE: the spooled DICOM file (file meta + dataset as sent), its SHA-256
    and size as written, and who sent it."""

    path: Path
    sha256: str
    size: int
    head: bytes  # the file's first HEAD_LIMIT bytes, to read the header without reading the file
    calling_ae: str
    called_ae: str
    peer: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


StoreHandler = Callable[[StoreRequest], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An association refused (A-ASSOCIATE-RJ) or aborted by Relais (A-ABORT), with the PDU
    that caused it (its first EVIDENCE_LIMIT bytes; the 6-byte header of an oversized one), or a
    dataset the peer left unfinished, with its first bytes."""

    answer: str  # "A-ASSOCIATE-RJ", "A-ABORT", or "none" (the peer went mid-dataset)
    code: str  # RJ: result-source-diagnostic ("1-1-3"); A-ABORT: source-reason ("2-6")
    reason: str
    peer: str
    calling_ae: str
    called_ae: str
    evidence: bytes


RefusalHandler = Callable[[Refusal], Awaitable[None]]


def _supported_contexts() -> list[PresentationContext]:
    syntaxes = [cx.abstract_syntax for cx in AllStoragePresentationContexts] + [VERIFICATION]
    return [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in syntaxes if uid is not None]


_SUPPORTED = _supported_contexts()


@dataclass(frozen=True, slots=True)
class AssociationRules:
    """What one listener accepts."""

    ae_title: str
    handler: StoreHandler
    spool: SpoolFiles
    allowed_calling_aets: frozenset[str] = frozenset()
    max_pdu: int = 1024 * 1024
    network_timeout: float = 60.0
    on_refusal: RefusalHandler | None = None  # records what was refused, before the answer


@dataclass(slots=True)
class _Dataset:
    """A dataset being received: into a spool file (C-STORE) or nowhere (another operation)."""

    context_id: int
    command: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    path: Path | None = None
    fd: int = -1
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    written_back: int = 0  # bytes whose writeback to disk was started
    head: bytearray = field(default_factory=bytearray)
    failed: str = ""

    def write(self, data: bytes | memoryview, last: bool = False) -> None:
        """Append a fragment; writeback starts early for all but the last (its fsync, in a
        worker thread, writes the rest: no block allocation on the event loop for it)."""
        if self.fd < 0:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:  # disk full, say: read the rest, answer out of resources
            self.failed = type(e).__name__
            self.discard()
            return
        self.digest.update(data)
        self.size += len(data)
        if len(self.head) < HEAD_LIMIT:
            self.head += data[: HEAD_LIMIT - len(self.head)]
        if not last and self.size - self.written_back >= WRITEBACK_CHUNK:
            start_writeback(self.fd, self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


async def serve_association(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rules: AssociationRules,
    peer: str,
    may_open: Callable[[], bool],
) -> None:
    """Run one association to its end (release, abort, timeout or a broken connection)."""
    association = _Association(reader, writer, rules, peer)
    try:
        await association.run(may_open)
    except ProtocolError as e:
        log.warning("dicom_association_aborted", peer=peer, reason=str(e))
        await association.abort(e.reason, str(e))
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        await association.record_cut(e)
    except Exception as e:  # a bug must end this association only, with an A-ABORT
        log.error("dicom_association_failed", peer=peer, error=type(e).__name__, detail=str(e)[:200])
        await association.abort(0x00, f"internal error ({type(e).__name__})")
    finally:
        association.drop_partial()


class _Association:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rules: AssociationRules, peer: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.rules = rules
        self.peer = peer
        self.calling_ae = ""
        self.called_ae = ""
        self.last_pdu = b""  # the start of the PDU read last: evidence if it is refused
        self.peer_max_pdu = 0  # 0: no limit
        self.contexts: dict[int, PresentationContext] = {}
        self.command = bytearray()
        self.dataset: _Dataset | None = None

    async def _read_pdu(self, limit: int) -> tuple[int, bytes]:
        """(PDU type, the PDU's bytes after its 6-byte header)."""
        async with asyncio.timeout(self.rules.network_timeout):
            header = await self.reader.readexactly(6)
            self.last_pdu = header
            kind, length = PDU_HEADER.unpack(header)
            if length > limit:
                raise ProtocolError(INVALID_PARAMETER, f"PDU of {length} bytes over the limit of {limit}")
            body = await self.reader.readexactly(length)
            self.last_pdu = header + body[:EVIDENCE_LIMIT]
            return kind, body

    async def _record(self, answer: str, code: str, reason: str) -> None:
        if self.rules.on_refusal is not None:
            refusal = Refusal(answer, code, reason, self.peer, self.calling_ae, self.called_ae, self.last_pdu)
            await self.rules.on_refusal(refusal)

    async def record_cut(self, error: Exception) -> None:
        """A dataset the peer never finished (connection lost, silent past `network_timeout`)
        is kept as refused with what came of it: its first EVIDENCE_LIMIT bytes."""
        dataset = self.dataset
        if dataset is None or dataset.command != _C_STORE_RQ:
            return  # between operations: nothing was left unfinished
        self.last_pdu = bytes(dataset.head[:EVIDENCE_LIMIT])
        how = "silent past the network timeout" if isinstance(error, TimeoutError) else "connection lost"
        await self._record("none", "", f"dataset cut after {dataset.size} bytes ({how})")

    async def abort(self, reason: int, detail: str) -> None:
        """Record what broke the protocol, then A-ABORT (service provider, `reason`)."""
        try:
            await self._record("A-ABORT", f"2-{reason}", detail)
        finally:
            self.writer.write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02" + bytes([reason]))

    async def run(self, may_open: Callable[[], bool]) -> None:
        kind, body = await self._read_pdu(_MAX_ASSOCIATE_RQ)
        if kind != _ASSOCIATE_RQ:
            raise ProtocolError(_UNEXPECTED_PDU, f"PDU type {kind} before A-ASSOCIATE-RQ")
        if not await self._associate(PDU_HEADER.pack(kind, len(body)) + body, may_open):
            return
        limit = self.rules.max_pdu
        while True:
            kind, pdu = await self._read_pdu(limit)
            if kind == P_DATA:
                await self._p_data(memoryview(pdu))
            elif kind == _RELEASE_RQ:
                self.writer.write(_RELEASE_RP_PDU)
                await self.writer.drain()
                return
            elif kind == _ABORT:
                return
            elif kind in (_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ, _RELEASE_RP):
                raise ProtocolError(_UNEXPECTED_PDU, f"PDU type {kind} in an established association")
            else:
                raise ProtocolError(_UNRECOGNIZED_PDU, f"unknown PDU type {kind}")

    async def _associate(self, pdu: bytes, may_open: Callable[[], bool]) -> bool:
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(pdu)
            request = rq.to_primitive()
        except Exception as e:  # pynetdicom raises whatever its decoders meet
            raise ProtocolError(INVALID_PARAMETER, f"unreadable A-ASSOCIATE-RQ ({type(e).__name__})") from e
        self.calling_ae = str(request.calling_ae_title or "").strip()
        self.called_ae = called_ae = str(request.called_ae_title or "").strip()
        user_items = list(request.user_information or [])
        for item in user_items:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        reject: tuple[int, int, int, str] | None = None
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            reject = (0x01, 0x01, 0x02, "application context not supported")  # permanent, service user
        elif not (rq.protocol_version & 1):
            reject = (0x01, 0x02, 0x02, "protocol version not supported")  # permanent, service provider (ACSE)
        elif called_ae != self.rules.ae_title:
            reject = (0x01, 0x01, 0x07, "called AE title not recognised")
        elif self.rules.allowed_calling_aets and self.calling_ae not in self.rules.allowed_calling_aets:
            reject = (0x01, 0x01, 0x03, "calling AE title not allowed")
        elif not may_open():
            reject = (0x02, 0x03, 0x02, "too many associations (local limit)")  # transient, presentation
        if reject is not None:
            log.info("dicom_association_rejected", peer=self.peer, calling_ae=self.calling_ae,
                     called_ae=called_ae, diagnostic=reject[2])  # fmt: skip
            await self._record("A-ASSOCIATE-RJ", "-".join(str(v) for v in reject[:3]), reject[3])
            primitive = A_ASSOCIATE()
            primitive.result, primitive.result_source, primitive.diagnostic = reject[:3]
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(primitive)
            self.writer.write(rj.encode())
            await self.writer.drain()
            return False
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in user_items
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, role_items = negotiate_as_acceptor(request.presentation_context_definition_list, _SUPPORTED, roles)
        self.contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00 and cx.context_id is not None}
        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.rules.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        accept.user_information = [max_length, implementation, version, *role_items]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        self.writer.write(ac.encode())
        await self.writer.drain()
        log.info("dicom_association_accepted", peer=self.peer, calling_ae=self.calling_ae, contexts=len(self.contexts))
        return True

    async def _p_data(self, body: memoryview) -> None:
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise ProtocolError(INVALID_PARAMETER, "truncated presentation data value item")
            length, context_id, control = PDV_HEADER.unpack_from(body, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError(INVALID_PARAMETER, "presentation data value item of a wrong length")
            if context_id not in self.contexts:
                raise ProtocolError(INVALID_PARAMETER, f"presentation context {context_id} was not accepted")
            data = body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            last = bool(control & 0x02)
            if control & 0x01:
                if self.dataset is not None:
                    raise ProtocolError(_UNEXPECTED_PDU, "command fragment inside a dataset")
                self.command += data
                if last:
                    await self._command_complete(context_id)
            else:
                dataset = self.dataset
                if dataset is None or dataset.context_id != context_id:
                    raise ProtocolError(_UNEXPECTED_PDU, "dataset fragment without its command")
                dataset.write(data, last)
                if last:
                    self.dataset = None
                    await self._dataset_complete(dataset)

    async def _command_complete(self, context_id: int) -> None:
        command = decode_command(bytes(self.command))
        self.command.clear()
        operation = us(command, 0x0100)
        message_id = us(command, 0x0110)
        sop_class = ui(command, 0x0002)
        has_dataset = us(command, 0x0800, _NO_DATASET) != _NO_DATASET
        if operation == _C_ECHO_RQ and not has_dataset:
            await self._respond(context_id, operation, message_id, sop_class or VERIFICATION, "", SUCCESS)
            return
        dataset = _Dataset(context_id, operation, message_id, sop_class, ui(command, 0x1000))
        if operation == _C_STORE_RQ and has_dataset:
            try:
                dataset.path, dataset.fd = await self.rules.spool.take()
            except OSError as e:  # read the dataset all the same, answer out of resources
                dataset.failed = type(e).__name__
            transfer_syntax = str(self.contexts[context_id].transfer_syntax[0])
            dataset.write(file_meta(sop_class, dataset.sop_instance_uid, transfer_syntax, self.calling_ae))
        if has_dataset:
            self.dataset = dataset  # another operation's dataset is read and dropped
        else:
            await self._respond(context_id, operation, message_id, sop_class, "", UNRECOGNIZED_OPERATION)

    async def _dataset_complete(self, dataset: _Dataset) -> None:
        dataset.close()
        if dataset.command != _C_STORE_RQ:
            status = UNRECOGNIZED_OPERATION
        elif dataset.path is None:
            log.error("dicom_spool_failed", peer=self.peer, error=dataset.failed)
            status = OUT_OF_RESOURCES
        else:
            request = StoreRequest(
                path=dataset.path,
                sha256=dataset.digest.hexdigest(),
                size=dataset.size,
                head=bytes(dataset.head),
                calling_ae=self.calling_ae,
                called_ae=self.rules.ae_title,
                peer=self.peer,
                sop_class_uid=dataset.sop_class_uid,
                sop_instance_uid=dataset.sop_instance_uid,
                transfer_syntax=str(self.contexts[dataset.context_id].transfer_syntax[0]),
            )
            dataset.path = None  # the handler owns the file now
            try:
                status = await self.rules.handler(request)
            except Exception as e:  # never let a bug answer success
                log.error("dicom_store_failed", error=type(e).__name__, detail=str(e)[:200])
                request.path.unlink(missing_ok=True)  # gone already if the handler placed it
                status = OUT_OF_RESOURCES
        await self._respond(
            dataset.context_id, dataset.command, dataset.message_id, dataset.sop_class_uid,
            dataset.sop_instance_uid, status,
        )  # fmt: skip

    async def _respond(
        self, context_id: int, operation: int, message_id: int, sop_class: str, sop_instance: str, status: int
    ) -> None:
        elements = [(0x0002, ui_value(sop_class))] if sop_class else []
        elements += [
            (0x0100, US.pack(operation | 0x8000)),
            (0x0120, US.pack(message_id)),
            (0x0800, US.pack(_NO_DATASET)),
            (0x0900, US.pack(status)),
        ]
        if sop_instance:
            elements.append((0x1000, ui_value(sop_instance)))
        self.writer.write(p_data_pdus(context_id, encode_command(elements), self.peer_max_pdu))
        await self.writer.drain()

    def drop_partial(self) -> None:
        """A connection that ends mid-dataset leaves nothing behind."""
        if self.dataset is not None:
            self.dataset.discard()
            self.dataset = None
