"""MLLP over TLS, with and without client certificates, against certificates made here."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from engine.er7 import Er7Message
from tests.conftest import adt
from tests.tls_material import make_pki


def tls_exchange(port: int, ca: Path, cert: tuple[Path, Path] | None, message: str) -> Er7Message:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        data = b""
        while b"\x1c" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the ACK")
            data += chunk
    return Er7Message.parse(data.strip(b"\x0b\x1c\r").decode())


def test_tls_listener_acks_and_records_the_client_certificate(relais, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca),
           "require_client_cert": True}  # fmt: skip
    running = relais(listeners={"mllp": [{"port": 0, "tls": tls}]})
    ack = tls_exchange(running.port, pki.ca, (pki.client_cert, pki.client_key), adt())
    assert ack.get("MSA-1") == "AA"
    [row] = running.store.query("SELECT peer FROM relais_messages")
    assert row["peer"].endswith("cn=SIH_CHU")


def test_client_without_certificate_is_refused_when_required(relais, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca),
           "require_client_cert": True}  # fmt: skip
    running = relais(listeners={"mllp": [{"port": 0, "tls": tls}]})
    for cert in (None, (pki.stranger_cert, pki.stranger_key)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_exchange(running.port, pki.ca, cert, adt())
    assert running.store.query("SELECT * FROM relais_messages") == []


def test_plain_tcp_on_a_tls_listener_gets_no_ack(relais, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    running = relais(listeners={"mllp": [{"port": 0, "tls": {"cert": str(pki.server_cert),
                                                             "key": str(pki.server_key)}}]})  # fmt: skip
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        sock.sendall(b"\x0b" + adt().encode() + b"\x1c\r")
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert b"MSA" not in answer
    # Server-only TLS (no client_ca) still serves TLS clients.
    assert tls_exchange(running.port, pki.ca, None, adt()).get("MSA-1") == "AA"
