"""Outbound destinations against real peers on 127.0.0.1: an MLLP receiver, an HTTP server,
the Mosquitto broker, a folder; and the registry that validates their settings."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from connectors.destination import Delivery, PermanentFailure, TemporaryFailure
from connectors.file import FileDropDestination
from connectors.http import HttpDestination
from connectors.mllp import MllpServer
from connectors.mllp_out import MllpDestination, parse_ack, sent_control_id
from connectors.mqtt import MqttDestination
from connectors.registry import (
    FileSettings,
    build_destination,
    validate_settings,
)
from tests.conftest import adt
from tests.tls_material import make_pki

BROKER = ("127.0.0.1", 1883)


def delivery(payload: bytes, **overrides: Any) -> Delivery:
    fields: dict[str, Any] = {
        "delivery_id": uuid.uuid4().hex,
        "message_id": uuid.uuid4().hex,
        "channel": "adt-to-lab",
        "destination": "lab",
        "payload": payload,
        "content_type": "application/hl7-v2",
        "metadata": {},
        **overrides,
    }
    return Delivery(**fields)


def hl7(control_id: str) -> bytes:
    return adt(control_id=control_id).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- MLLP receiver ---------------------------------------------------------------------------


def msh10(raw: bytes) -> str:
    return raw.split(b"\r", 1)[0].split(b"|")[9].decode()


def build_ack(code: str, control_id: str) -> bytes:
    msh = f"MSH|^~\\&|LAB|LABO|RELAIS|GRADES|20261123101501||ACK^A01^ACK|ACK{control_id}|P|2.5"
    return f"{msh}\rMSA|{code}|{control_id}\r".encode()


@dataclass
class ScriptedPartner:
    """An MLLP receiver's handler whose answer the test picks: an ACK code, a wrong MSA-2,
    nothing at all, or an ACK that comes too late."""

    mode: str = "AA"
    late_by: float = 0.0
    received: list[tuple[str, str]] = field(default_factory=list)  # (MSH-10, peer)

    async def handle(self, raw: bytes, peer: str) -> bytes | None:
        control_id = msh10(raw)
        self.received.append((control_id, peer))
        if self.late_by:
            await asyncio.sleep(self.late_by)
        if self.mode == "silent":
            return None
        if self.mode == "wrong":
            return build_ack("AA", "SOMETHING-ELSE")
        return build_ack(self.mode, control_id)

    async def oversized(self, prefix: bytes, peer: str) -> bytes | None:
        return None

    async def truncated(self, partial: bytes, peer: str, reason: str) -> None:
        return None


@pytest.fixture
async def partner() -> AsyncIterator[tuple[ScriptedPartner, MllpServer]]:
    handler = ScriptedPartner()
    server = MllpServer(name="partner", host="127.0.0.1", port=0, handler=handler, idle_timeout=30)
    await server.start()
    yield handler, server
    await server.stop(grace=0.1)


@pytest.fixture
async def mllp_dest(partner: tuple[ScriptedPartner, MllpServer]) -> AsyncIterator[MllpDestination]:
    dest = MllpDestination("lab", "127.0.0.1", partner[1].bound_port, ack_timeout=0.5, connect_timeout=2)
    yield dest
    await dest.close()


async def test_mllp_aa_with_matching_msa2_is_delivered_on_one_persistent_connection(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination
) -> None:
    handler, _ = partner
    first = await mllp_dest.deliver(delivery(hl7("CTRL-1")))
    second = await mllp_dest.deliver(delivery(hl7("CTRL-2")))
    assert first.detail == "MSA AA" and second.detail == "MSA AA"
    assert parse_ack(first.response) == ("AA", "CTRL-1")
    assert [c for c, _ in handler.received] == ["CTRL-1", "CTRL-2"]
    assert handler.received[0][1] == handler.received[1][1], "both messages went over the same connection"


async def test_mllp_several_connections_carry_messages_in_parallel_each_with_its_own_ack(
    partner: tuple[ScriptedPartner, MllpServer],
) -> None:
    handler, server = partner
    handler.late_by = 0.2  # a partner that takes its time: one connection would serialise them
    dest = MllpDestination("lab", "127.0.0.1", server.bound_port, ack_timeout=5, connections=3)
    try:
        outcomes = await asyncio.gather(*(dest.deliver(delivery(hl7(f"PAR-{i}"))) for i in range(6)))
        assert [parse_ack(o.response) for o in outcomes] == [("AA", f"PAR-{i}") for i in range(6)]
        assert len({peer for _, peer in handler.received}) == 3, "three connections, reused"
    finally:
        await dest.close()


async def test_mllp_commit_ack_ca_is_a_success(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination
) -> None:
    partner[0].mode = "CA"
    assert (await mllp_dest.deliver(delivery(hl7("CTRL-CA")))).detail == "MSA CA"


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
async def test_mllp_negative_ack_is_a_temporary_failure_naming_code_and_control_id(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination, code: str
) -> None:
    partner[0].mode = code
    with pytest.raises(TemporaryFailure) as failure:
        await mllp_dest.deliver(delivery(hl7("CTRL-NEG")))
    assert str(failure.value) == f"MSA {code} for CTRL-NEG"
    assert "MARTIN" not in str(failure.value)  # no patient data in the detail


async def test_mllp_ack_for_another_control_id_fails_and_drops_the_connection(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination
) -> None:
    handler, _ = partner
    handler.mode = "wrong"
    with pytest.raises(TemporaryFailure, match="acknowledges 'SOMETHING-ELSE', sent 'CTRL-X'"):
        await mllp_dest.deliver(delivery(hl7("CTRL-X")))
    handler.mode = "AA"
    assert (await mllp_dest.deliver(delivery(hl7("CTRL-Y")))).detail == "MSA AA"
    assert handler.received[0][1] != handler.received[1][1], "a new connection after the mismatch"


async def test_mllp_ack_timeout_fails_and_a_late_ack_is_not_taken_for_the_next_message(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination
) -> None:
    handler, _ = partner
    handler.late_by = 0.8  # the destination waits 0.5 s
    started = time.monotonic()
    with pytest.raises(TemporaryFailure, match=r"no ACK for CTRL-SLOW within 0\.5 s"):
        await mllp_dest.deliver(delivery(hl7("CTRL-SLOW")))
    assert time.monotonic() - started < 2
    handler.late_by = 0
    outcome = await mllp_dest.deliver(delivery(hl7("CTRL-NEXT")))
    assert parse_ack(outcome.response) == ("AA", "CTRL-NEXT")
    assert handler.received[0][1] != handler.received[1][1], "the next message used a fresh connection"


async def test_mllp_partner_that_never_answers_times_out(
    partner: tuple[ScriptedPartner, MllpServer], mllp_dest: MllpDestination
) -> None:
    partner[0].mode = "silent"
    with pytest.raises(TemporaryFailure, match="no ACK"):
        await mllp_dest.deliver(delivery(hl7("CTRL-SILENT")))


async def test_mllp_receiver_down_is_a_temporary_failure() -> None:
    dest = MllpDestination("lab", "127.0.0.1", free_port(), ack_timeout=1, connect_timeout=1)
    try:
        with pytest.raises(TemporaryFailure, match="cannot connect"):
            await dest.deliver(delivery(hl7("CTRL-DOWN")))
    finally:
        await dest.close()


async def test_mllp_reconnects_when_the_partner_closed_the_idle_connection() -> None:
    handler = ScriptedPartner()
    server = MllpServer(name="partner", host="127.0.0.1", port=0, handler=handler, idle_timeout=0.2)
    await server.start()
    dest = MllpDestination("lab", "127.0.0.1", server.bound_port, ack_timeout=1)
    try:
        await dest.deliver(delivery(hl7("CTRL-A")))
        await asyncio.sleep(0.5)  # the partner drops the idle connection
        assert (await dest.deliver(delivery(hl7("CTRL-B")))).detail == "MSA AA"
    finally:
        await dest.close()
        await server.stop(grace=0.1)


async def test_mllp_partner_restart_costs_one_temporary_failure_at_most(
    partner: tuple[ScriptedPartner, MllpServer],
) -> None:
    handler, server = partner
    port = server.bound_port
    dest = MllpDestination("lab", "127.0.0.1", port, ack_timeout=1, connect_timeout=1)
    try:
        await dest.deliver(delivery(hl7("CTRL-1")))
        await server.stop(grace=0.1)
        with pytest.raises(TemporaryFailure):
            await dest.deliver(delivery(hl7("CTRL-2")))
        restarted = MllpServer(name="partner", host="127.0.0.1", port=port, handler=handler)
        await restarted.start()
        try:
            assert (await dest.deliver(delivery(hl7("CTRL-3")))).detail == "MSA AA"
        finally:
            await restarted.stop(grace=0.1)
    finally:
        await dest.close()


async def test_mllp_payload_without_msh_or_msh10_is_a_permanent_failure(mllp_dest: MllpDestination) -> None:
    with pytest.raises(PermanentFailure, match="no MSH"):
        await mllp_dest.deliver(delivery(b"PID|1||123"))
    with pytest.raises(PermanentFailure, match="MSH-10"):
        await mllp_dest.deliver(delivery(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|||2.5\r"))


async def test_mllp_sets_tcp_nodelay(mllp_dest: MllpDestination) -> None:
    await mllp_dest.deliver(delivery(hl7("CTRL-ND")))
    writer = mllp_dest._links[0].writer
    assert writer is not None
    sock = writer.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_mllp_mutual_tls_built_by_the_registry_with_paths_relative_to_base_dir(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    handler = ScriptedPartner()
    server = MllpServer(name="tls", host="127.0.0.1", port=0, handler=handler, ssl_context=server_ctx)
    await server.start()
    settings = {"host": "127.0.0.1", "port": server.bound_port, "tls": True, "tls_ca": "pki/ca.pem",
                "tls_cert": "pki/client.pem", "tls_key": "pki/client.key"}  # fmt: skip
    dest = build_destination("lab-tls", "mllp", settings, tmp_path)
    try:
        assert (await dest.deliver(delivery(hl7("CTRL-TLS")))).detail == "MSA AA"
        assert "cn=SIH_CHU" in handler.received[0][1]
    finally:
        await dest.close()
        await server.stop(grace=0.1)


def test_control_id_and_ack_parsing_follow_the_message_separators() -> None:
    assert sent_control_id(b"MSH#^~\\&#A#B#C#D#2026##ADT^A01#ID-9#P#2.5\rPID#1") == "ID-9"
    assert parse_ack(b"MSH#^~\\&#A#B#C#D#2026##ACK#X#P#2.5\rMSA#ae#ID-9#bad\r") == ("AE", "ID-9")
    assert parse_ack(b"MSH|^~\\&|A|B\rERR|x\r") is None
    assert parse_ack(b"garbage") is None


# -- HTTP receiver ---------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class HttpPartner:
    """A ThreadingHTTPServer on loopback that records requests and answers `status`."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.status = 200
        self.delay = 0.0
        self.requests: list[Recorded] = []
        partner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                partner.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
                if partner.delay:
                    time.sleep(partner.delay)
                reply = b'{"ok": true}'
                try:
                    self.send_response(partner.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            do_PUT = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/inbound/hl7"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def http_partner() -> Iterator[HttpPartner]:
    partner = HttpPartner()
    yield partner
    partner.stop()


async def test_http_raw_post_carries_payload_content_type_and_idempotency_headers(
    http_partner: HttpPartner,
) -> None:
    dest = HttpDestination("api", http_partner.url, headers={"X-Partner": "lab"}, bearer_token="s3cret")
    d = delivery(hl7("CTRL-H1"))
    try:
        outcome = await dest.deliver(d)
        again = await dest.deliver(d)  # a redelivery: the same idempotency key
    finally:
        await dest.close()
    assert outcome.detail == "HTTP 200" and outcome.response == b'{"ok": true}'
    assert again.detail == "HTTP 200"
    first, second = http_partner.requests
    assert (first.method, first.path, first.body) == ("POST", "/inbound/hl7", d.payload)
    assert first.headers["Content-Type"] == "application/hl7-v2"
    assert first.headers["Idempotency-Key"] == d.delivery_id == second.headers["Idempotency-Key"]
    assert first.headers["X-Relais-Message-Id"] == d.message_id
    assert first.headers["Authorization"] == "Bearer s3cret"
    assert first.headers["X-Partner"] == "lab"


async def test_http_json_envelope_has_hl7_as_latin1_text_and_other_payloads_as_base64(
    http_partner: HttpPartner,
) -> None:
    dest = HttpDestination("api", http_partner.url, body="json", method="put")
    hl7_bytes = "MSH|^~\\&|A|B|C|D|2026||ADT^A01|É-1|P|2.5\r".encode()  # UTF-8 bytes
    pdf = b"%PDF-1.7\x00\xff binary"
    try:
        await dest.deliver(delivery(hl7_bytes, metadata={"control_id": "É-1"}))
        await dest.deliver(delivery(pdf, content_type="application/pdf"))
    finally:
        await dest.close()
    first, second = http_partner.requests
    assert first.method == "PUT" and first.headers["Content-Type"] == "application/json"
    envelope = json.loads(first.body)
    assert set(envelope) == {"message_id", "delivery_id", "channel", "destination", "content_type",
                             "metadata", "payload"}  # fmt: skip
    assert envelope["payload"].encode("latin-1") == hl7_bytes  # lossless
    assert envelope["metadata"] == {"control_id": "É-1"}
    other = json.loads(second.body)
    assert "payload" not in other and base64.b64decode(other["payload_base64"]) == pdf


@pytest.mark.parametrize("status", [408, 425, 429, 500, 503])
async def test_http_retryable_statuses_are_temporary_failures(http_partner: HttpPartner, status: int) -> None:
    http_partner.status = status
    dest = HttpDestination("api", http_partner.url)
    try:
        with pytest.raises(TemporaryFailure, match=f"HTTP {status}"):
            await dest.deliver(delivery(hl7("CTRL-H")))
    finally:
        await dest.close()


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_http_other_client_errors_are_permanent_failures(http_partner: HttpPartner, status: int) -> None:
    http_partner.status = status
    dest = HttpDestination("api", http_partner.url)
    try:
        with pytest.raises(PermanentFailure, match=f"HTTP {status}"):
            await dest.deliver(delivery(hl7("CTRL-H")))
    finally:
        await dest.close()


async def test_http_slow_partner_times_out_as_a_temporary_failure(http_partner: HttpPartner) -> None:
    http_partner.delay = 1.5
    dest = HttpDestination("api", http_partner.url, timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(TemporaryFailure, match=r"no HTTP response within 0\.3 s"):
            await dest.deliver(delivery(hl7("CTRL-H")))
    finally:
        await dest.close()
    assert time.monotonic() - started < 1.2


async def test_https_with_client_certificate_built_by_the_registry(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    partner = HttpPartner(server_ctx)
    settings = {"url": partner.url, "tls_ca": "pki/ca.pem", "tls_cert": "pki/client.pem",
                "tls_key": "pki/client.key"}  # fmt: skip
    dest = build_destination("api-tls", "http", settings, tmp_path)
    try:
        assert (await dest.deliver(delivery(hl7("CTRL-HTLS")))).detail == "HTTP 200"
    finally:
        await dest.close()
        partner.stop()
    assert partner.requests[0].body == hl7("CTRL-HTLS")


async def test_http_partner_down_is_a_temporary_failure() -> None:
    dest = HttpDestination("api", f"http://127.0.0.1:{free_port()}/x", timeout=2)
    try:
        with pytest.raises(TemporaryFailure, match="ConnectError"):
            await dest.deliver(delivery(hl7("CTRL-H")))
    finally:
        await dest.close()


# -- MQTT (the Mosquitto broker on 127.0.0.1:1883) -------------------------------------------


@pytest.fixture
def broker() -> tuple[str, int]:
    try:
        with socket.create_connection(BROKER, timeout=1):
            pass
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("the Mosquitto broker is not reachable on 127.0.0.1:1883 and CI=true")
        pytest.skip("no MQTT broker on 127.0.0.1:1883 (start mosquitto to run this test)")
    return BROKER


async def _publish_and_receive(dest: MqttDestination, d: Delivery, subscription: str) -> aiomqtt.Message:
    async with aiomqtt.Client(BROKER[0], BROKER[1], identifier=f"test-{uuid.uuid4().hex[:8]}") as sub:
        await sub.subscribe(subscription, qos=1)
        outcome = await dest.deliver(d)
        assert outcome.detail == f"published qos {dest.qos}"
        async with asyncio.timeout(5):
            return await sub.messages.__anext__()


async def test_mqtt_publishes_the_payload_on_a_topic_built_from_routing_metadata(
    broker: tuple[str, int],
) -> None:
    run = uuid.uuid4().hex[:8]
    dest = MqttDestination("bus", *broker, topic=f"relais-test/{run}/{{sending_facility}}/{{message_type}}"
                           "/{trigger_event}/{destination}")  # fmt: skip
    d = delivery(hl7("CTRL-M1"), metadata={"sending_facility": "CHU/EXEMPLE#1", "message_type": "ADT",
                                            "trigger_event": "A01", "patient_id": "123456"})  # fmt: skip
    try:
        message = await _publish_and_receive(dest, d, f"relais-test/{run}/#")
        assert message.topic.value == f"relais-test/{run}/CHU_EXEMPLE_1/ADT/A01/lab"
        assert message.payload == d.payload
        # the client stays connected for the next delivery
        client = dest._client
        await dest.deliver(d)
        assert dest._client is client
    finally:
        await dest.close()


async def test_mqtt_json_body_is_the_same_envelope_as_http(broker: tuple[str, int]) -> None:
    run = uuid.uuid4().hex[:8]
    dest = MqttDestination("bus", *broker, topic=f"relais-test/{run}/{{channel}}", body="json", qos=1)
    d = delivery(hl7("CTRL-M2"))
    try:
        message = await _publish_and_receive(dest, d, f"relais-test/{run}/#")
    finally:
        await dest.close()
    assert isinstance(message.payload, bytes)
    envelope = json.loads(message.payload)
    assert envelope["delivery_id"] == d.delivery_id and envelope["payload"].encode("latin-1") == d.payload


async def test_mqtt_reconnects_after_the_broker_dropped_the_client(broker: tuple[str, int]) -> None:
    run = uuid.uuid4().hex[:8]
    dest = MqttDestination("bus", *broker, topic=f"relais-test/{run}/{{channel}}")
    try:
        await dest.deliver(delivery(hl7("CTRL-R1")))
        first = dest._client
        async with aiomqtt.Client(*broker, identifier=dest.client_id):
            pass  # same client id: the broker disconnects the destination's session (takeover)
        await asyncio.sleep(0.3)
        message = await _publish_and_receive(dest, delivery(hl7("CTRL-R2")), f"relais-test/{run}/#")
        assert message.payload == hl7("CTRL-R2")
        assert dest._client is not first
    finally:
        await dest.close()


async def test_mqtt_broker_down_is_a_temporary_failure() -> None:
    dest = MqttDestination("bus", "127.0.0.1", free_port(), timeout=2)
    try:
        with pytest.raises(TemporaryFailure, match="MQTT publish"):
            await dest.deliver(delivery(hl7("CTRL-M3")))
    finally:
        await dest.close()


# -- file drop -------------------------------------------------------------------------------


async def test_file_drop_writes_exact_content_atomically_and_leaves_no_temp_file(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "lab"  # created on first delivery
    dest = FileDropDestination("drop", folder)
    d = delivery(hl7("CTRL-F1"))
    outcome = await dest.deliver(d)
    expected = f"{d.message_id}-{d.delivery_id}.hl7"
    assert outcome.detail == f"written {expected}"
    assert [p.name for p in folder.iterdir()] == [expected]
    assert (folder / expected).read_bytes() == d.payload


async def test_file_redelivery_is_idempotent_and_a_different_file_gets_a_suffix(tmp_path: Path) -> None:
    dest = FileDropDestination("drop", tmp_path, filename_template="{control_id}.hl7")
    d = delivery(hl7("CTRL-F2"), metadata={"control_id": "CTRL-F2"})
    await dest.deliver(d)
    again = await dest.deliver(d)
    other = await dest.deliver(delivery(hl7("CTRL-F2") + b"NTE|1\r", metadata={"control_id": "CTRL-F2"}))
    assert again.detail == "already present CTRL-F2.hl7"
    assert other.detail == "written CTRL-F2-2.hl7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CTRL-F2-2.hl7", "CTRL-F2.hl7"]
    assert (tmp_path / "CTRL-F2.hl7").read_bytes() == d.payload


@pytest.mark.parametrize(
    ("template", "channel"),
    [("{channel}.hl7", "../../escaped"), ("../{channel}.hl7", "x"), ("/tmp/{channel}", "abs"),
     ("{channel}", ".."), ("{channel}", "sub/dir\\evil\x00")],
)  # fmt: skip
async def test_file_name_never_escapes_the_folder(tmp_path: Path, template: str, channel: str) -> None:
    folder = tmp_path / "drop"
    outcome = await FileDropDestination("drop", folder, filename_template=template).deliver(
        delivery(b"MSH|x", channel=channel)
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parent == folder, outcome.detail
    assert not files[0].name.startswith(".")


async def test_file_write_error_is_temporary_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("connectors.file.os.replace", broken_replace)
    with pytest.raises(TemporaryFailure, match="errno 28"):
        await FileDropDestination("drop", tmp_path).deliver(delivery(b"MSH|x"))
    assert list(tmp_path.iterdir()) == []


async def test_file_folder_that_cannot_be_created_is_a_temporary_failure(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(TemporaryFailure):
        await FileDropDestination("drop", tmp_path / "taken" / "out").deliver(delivery(b"MSH|x"))


# -- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "settings", "expected"),
    [
        ("file", {"folder": "out", "colour": "red"}, "colour: unknown setting, expected one of folder"),
        ("mllp", {"port": 2575}, "host: required setting is missing"),
        ("mllp", {"host": "lab", "port": 70000}, "port: Input should be less than or equal to 65535"),
        ("mllp", {"host": "lab", "port": 1, "tls": True, "tls_ca": "nope.pem"}, "tls_ca: expected an existing"),
        ("http", {"url": "ftp://x"}, "url: expected an http:// or https:// URL"),
        ("http", {"url": "http://x", "body": "xml"}, "body: Input should be 'raw' or 'json'"),
        ("http", {"url": "http://x", "headers": {"Idempotency-Key": "1"}}, "headers: header Idempotency-Key"),
        ("http", {"url": "http://x", "timeout": 0}, "timeout: Input should be greater than 0"),
        ("mqtt", {"host": "b", "topic": "relais/{patient_id}"}, "topic: unknown placeholder {patient_id}"),
        ("mqtt", {"host": "b", "topic": "relais/#"}, "topic: a publish topic must be non-empty"),
        ("mqtt", {"host": "b", "qos": 3}, "qos: Input should be 0, 1 or 2"),
        ("file", {"folder": "o", "filename_template": "{payload}"}, "filename_template: unknown placeholder"),
        ("x400", {}, "kind: unknown destination kind, expected one of"),  # the list grows with each protocol
    ],
)  # fmt: skip
def test_registry_errors_name_the_key_and_what_was_expected(
    tmp_path: Path, kind: str, settings: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError, match="lab") as error:
        build_destination("lab", kind, settings, tmp_path)
    assert expected in str(error.value)


def test_registry_validates_without_building_and_resolves_relative_paths(tmp_path: Path) -> None:
    settings = validate_settings("file", {"folder": "out/lab"}, tmp_path)
    assert isinstance(settings, FileSettings) and settings.folder == tmp_path / "out" / "lab"
    assert not (tmp_path / "out").exists()  # validation creates nothing


async def test_registry_builds_each_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAIS_TEST_TOKEN", "t0ken")
    built = [
        build_destination("m", "mllp", {"host": "127.0.0.1", "port": 2575}, tmp_path),
        build_destination("h", "http", {"url": "https://x.test/in", "bearer_token_env": "RELAIS_TEST_TOKEN"},
                          tmp_path),
        build_destination("f", "file", {"folder": "drop"}, tmp_path),
        build_destination("q", "mqtt", {"host": "127.0.0.1", "password_env": "RELAIS_TEST_TOKEN",
                                        "username": "relais"}, tmp_path),
    ]  # fmt: skip
    assert [type(d).__name__ for d in built] == [
        "MllpDestination", "HttpDestination", "FileDropDestination", "MqttDestination"]  # fmt: skip
    assert [d.name for d in built] == ["m", "h", "f", "q"]
    for d in built:
        await d.close()
    with pytest.raises(ValueError, match="bearer_token_env: environment variable RELAIS_NOPE is not set"):
        build_destination("h", "http", {"url": "http://x", "bearer_token_env": "RELAIS_NOPE"}, tmp_path)
