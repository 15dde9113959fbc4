"""MLLP framing and listener limits, byte by byte over real sockets."""

from __future__ import annotations

import socket
import time

from engine.er7 import Er7Message
from tests.conftest import adt

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_acks(sock: socket.socket, count: int) -> list[Er7Message]:
    buf = b""
    while buf.count(EB) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    frames = [f.strip(SB + CR) for f in buf.split(EB) if f.strip(SB + CR)]
    return [Er7Message.parse(f.decode()) for f in frames]


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_junk_before_start_byte_is_dropped(relais) -> None:
    running = relais()
    message = adt()
    with connect(running.port) as sock:
        sock.sendall(b"\r\nGARBAGE\x00\xff" + SB + message.encode() + EB + CR)
        [ack] = read_acks(sock, 1)
    assert ack.get("MSA-1") == "AA"
    assert ack.get("MSA-2") == Er7Message.parse(message).get("MSH-10")


def test_missing_final_cr_is_accepted(relais) -> None:
    running = relais()
    first, second = adt(), adt()
    with connect(running.port) as sock:
        sock.sendall(SB + first.encode() + EB)
        [ack] = read_acks(sock, 1)
        assert ack.get("MSA-1") == "AA"
        sock.sendall(SB + second.encode() + EB)
        [ack2] = read_acks(sock, 1)
    assert ack2.get("MSA-2") == Er7Message.parse(second).get("MSH-10")


def test_several_frames_in_one_write_are_answered_in_order(relais) -> None:
    running = relais()
    messages = [adt() for _ in range(5)]
    with connect(running.port) as sock:
        sock.sendall(b"".join(SB + m.encode() + EB + CR for m in messages))
        acks = read_acks(sock, 5)
    assert [a.get("MSA-2") for a in acks] == [Er7Message.parse(m).get("MSH-10") for m in messages]
    assert all(a.get("MSA-1") == "AA" for a in acks)


def test_one_frame_over_many_slow_writes(relais) -> None:
    running = relais()
    data = SB + adt().encode() + EB + CR
    with connect(running.port) as sock:
        for i in range(0, len(data), 7):
            sock.sendall(data[i : i + 7])
            time.sleep(0.002)
        [ack] = read_acks(sock, 1)
    assert ack.get("MSA-1") == "AA"


def test_oversized_frame_gets_ar_then_close_and_is_recorded(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "max_frame_bytes": 4096}]})
    message = adt(extra_segments=tuple(f"NTE|{i}||{'x' * 200}" for i in range(40)))
    assert len(message) > 4096
    with connect(running.port) as sock:
        sock.sendall(SB + message.encode() + EB + CR)
        [ack] = read_acks(sock, 1)
        assert ack.get("MSA-1") == "AR" and ack.get("ERR-3.1") == "100"
        # The NAK still answers the message it could read the header of.
        assert ack.get("MSA-2") == Er7Message.parse(message).get("MSH-10")
        assert closed_by_peer(sock, 5)
    [row] = running.store.query("SELECT * FROM relais_messages")
    assert row["status"] == "reject" and "larger than 4096" in row["reason"]
    assert running.store.payload(row["payload_sha256"]) == message.encode()[:4096]


def test_listener_stays_up_after_oversized_frame(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "max_frame_bytes": 1024}]})
    with connect(running.port) as sock:
        sock.sendall(SB + b"MSH|" + b"y" * 5000)
        read_acks(sock, 1)
    with connect(running.port) as sock:
        sock.sendall(SB + b"MSH|^~\\&|A|B|C|D|20261123||ADT^A01|SMALL1|P|2.5" + EB + CR)
        [ack] = read_acks(sock, 1)
    assert ack.get("MSA-1") == "AA"


def test_frame_cut_off_by_the_sender_is_recorded_not_dropped(relais) -> None:
    running = relais()
    partial = adt().encode()[:150]
    with connect(running.port) as sock:
        sock.sendall(SB + partial)
    deadline = time.monotonic() + 5
    rows: list[dict] = []
    while time.monotonic() < deadline and not rows:
        rows = running.store.query("SELECT * FROM relais_messages")
        time.sleep(0.05)
    [row] = rows
    assert row["status"] == "reject" and "closed in the middle of a frame" in row["reason"]
    assert running.store.payload(row["payload_sha256"]) == partial


def test_idle_connection_is_closed(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "idle_timeout": 0.5}]})
    with connect(running.port) as sock:
        sock.sendall(SB + b"MSH|^~\\&|SLOW")
        assert closed_by_peer(sock, 5)
    rows = running.store.query("SELECT reason FROM relais_messages")
    assert rows and "idle" in rows[0]["reason"]


def test_connection_limit_per_listener(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "max_connections": 2}]})
    first, second = connect(running.port), connect(running.port)
    try:
        for sock in (first, second):  # both served
            sock.sendall(SB + adt().encode() + EB + CR)
            assert read_acks(sock, 1)[0].get("MSA-1") == "AA"
        with connect(running.port) as third:
            assert closed_by_peer(third, 5)
        first.close()
        time.sleep(0.2)
        with connect(running.port) as fourth:  # a slot is free again
            fourth.sendall(SB + adt().encode() + EB + CR)
            assert read_acks(fourth, 1)[0].get("MSA-1") == "AA"
    finally:
        first.close()
        second.close()


def test_peer_outside_allowed_networks_is_refused(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "allowed_peers": ["10.0.0.0/8"]}]})
    with connect(running.port) as sock:
        sock.sendall(SB + adt().encode() + EB + CR)
        assert closed_by_peer(sock, 5)
    assert running.store.query("SELECT * FROM relais_messages") == []
    allowed = relais(listeners={"mllp": [{"port": 0, "allowed_peers": ["127.0.0.0/8", "::1/128"]}]})
    with connect(allowed.port) as sock:
        sock.sendall(SB + adt().encode() + EB + CR)
        assert read_acks(sock, 1)[0].get("MSA-1") == "AA"
