"""The DICOM upper layer against peers that break the protocol: each gets a precise PS3.8
answer (A-ABORT, A-ASSOCIATE-RJ, a DIMSE failure status), is recorded as a rejected message
with the PDU that caused it, no instance is stored from it, and the listener goes on serving
the next client."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from tests.conftest import wait_for
from tests.dicom_files import dcmtk, dicom_listeners, sample


def association_request(called: str = "RELAIS") -> bytes:
    """A-ASSOCIATE-RQ bytes as an SCU sends them: CT storage in explicit VR LE as context 1."""
    context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = called
    primitive.user_information = [max_length, implementation]
    primitive.presentation_context_definition_list = [context]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    kind, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return kind, body


@contextmanager
def associated(port: int, timeout: float = 5) -> Iterator[socket.socket]:
    """A raw socket with an accepted association (CT storage is presentation context 1)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(association_request())
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        yield sock


def refusals(running: Any) -> list[dict[str, Any]]:
    """The refused associations recorded, each with the bytes that caused it."""
    rows = running.store.query(
        "SELECT message_id, peer, ack_code, error_code, reason, payload_sha256 FROM relais_messages "
        "WHERE protocol = 'dicom' AND status = 'reject' ORDER BY received_at"
    )
    return [{**r, "evidence": running.store.payload(r["payload_sha256"])} for r in rows]


def still_serving(port: int, tmp_path: Path) -> None:
    done = dcmtk("storescu", "-aec", "RELAIS", "127.0.0.1", port, sample("CT_small.dcm", tmp_path))
    assert done.returncode == 0, done.stderr


def test_garbage_instead_of_an_association_request_is_aborted(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    port = running.app.port_of("dicom")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x04\x00\x00\x00\x00\x02\x00\x00")  # P-DATA before any association
        kind, body = read_pdu(sock)
    assert kind == 0x07  # A-ABORT, by the service provider (source 2), unexpected PDU (reason 2)
    assert body[2:4] == b"\x02\x02"
    (refused,) = refusals(running)
    assert (refused["ack_code"], refused["error_code"], refused["peer"]) == ("A-ABORT", "2-2", "127.0.0.1")
    assert refused["evidence"] == b"\x04\x00\x00\x00\x00\x02\x00\x00"  # what the peer sent
    assert "before A-ASSOCIATE-RQ" in refused["reason"]
    still_serving(port, tmp_path)


def test_accepted_association_gets_its_contexts_and_our_implementation(relais) -> None:
    running = relais(listeners=dicom_listeners())
    with socket.create_connection(("127.0.0.1", running.app.port_of("dicom")), timeout=5) as sock:
        sock.sendall(association_request())
        kind, body = read_pdu(sock)
        assert kind == 0x02  # A-ASSOCIATE-AC
        assert b"RELAIS_1" in body  # implementation version name
        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


def test_pdu_longer_than_the_maximum_is_aborted_and_stores_nothing(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(max_pdu=131072))
    port = running.app.port_of("dicom")
    with associated(port) as sock:
        sock.sendall(struct.pack(">BxI", 0x04, 50_000_000))  # announces 50 MB in one PDU
        kind, body = read_pdu(sock)
    assert kind == 0x07 and body[2:4] == b"\x02\x06"  # invalid PDU parameter value
    # Recorded as refused, with the header that announced it; no instance.
    assert [e.topic for e in running.store.read_log()] == ["relais.MessageReceived", "relais.MessageRejected"]
    (refused,) = refusals(running)
    assert refused["error_code"] == "2-6" and "over the limit" in refused["reason"]
    assert refused["evidence"] == struct.pack(">BxI", 0x04, 50_000_000)
    still_serving(port, tmp_path)


def test_data_on_a_context_that_was_not_accepted_is_aborted(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    port = running.app.port_of("dicom")
    with associated(port) as sock:
        pdv = struct.pack(">IBB", 6, 99, 0x03) + b"\x00" * 4  # context 99 was never proposed
        sock.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        kind, body = read_pdu(sock)
    assert kind == 0x07 and body[2:4] == b"\x02\x06"
    (refused,) = refusals(running)
    assert "context 99" in refused["reason"] and refused["evidence"].endswith(pdv)
    still_serving(port, tmp_path)


def test_silent_client_is_closed_after_the_network_timeout(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(network_timeout=1.0))
    port = running.app.port_of("dicom")
    with associated(port, timeout=10) as sock:
        started = time.monotonic()
        assert read_pdu(sock) == (0, b"")  # closed by Relais, not by our 10 s timeout
        assert time.monotonic() - started < 9
    still_serving(port, tmp_path)


def test_associations_over_the_limit_are_rejected_transiently(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(max_associations=1))
    port = running.app.port_of("dicom")
    rejections: list[Any] = []
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    first = ae.associate("127.0.0.1", port, ae_title="RELAIS")
    assert first.is_established
    try:
        second = ae.associate(
            "127.0.0.1", port, ae_title="RELAIS",
            evt_handlers=[(evt.EVT_REJECTED, lambda event: rejections.append(event.assoc.acceptor.primitive))],
        )  # fmt: skip
        assert second.is_rejected
        (primitive,) = rejections
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x02, 0x03, 0x02)
        (refused,) = refusals(running)
        assert (refused["ack_code"], refused["error_code"]) == ("A-ASSOCIATE-RJ", "2-3-2")
        assert refused["evidence"][:1] == b"\x01"  # the A-ASSOCIATE-RQ as received
    finally:
        first.release()
    assert wait_for(lambda: dcmtk("echoscu", "-aec", "RELAIS", "127.0.0.1", port).returncode == 0,
                    "a new association once the first is released")  # fmt: skip


def test_operation_that_is_not_a_store_gets_unrecognized_operation(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    port = running.app.port_of("dicom")
    ds = dcmread(sample("CT_small.dcm", tmp_path))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    # C-FIND's context is refused at association; only storage and verification are offered.
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="RELAIS")
    try:
        find_contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax.endswith(".2.2.1")]
        assert find_contexts == []
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
