"""SMTP destination (STARTTLS + AUTH) and MDNs (RFC 8098) sent through the outbox, tried
against a second Relais whose SMTP listener plays the MSSanté relay."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from connectors.destination import Delivery, PermanentFailure, TemporaryFailure
from connectors.registry import build_destination, validate_settings
from tests.conftest import wait_for
from tests.mail_samples import Mail, xdm_zip
from tests.test_smtp_listener import PASSWORD, USER, session, smtp_listener
from tests.tls_material import make_pki


def relay(relais, tmp_path: Path, port: int = 0):
    """A Relais playing the MSSanté relay: certificate from a test CA, one account."""
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    running = relais(listeners={"mllp": [], "smtp": [smtp_listener(port=port, tls=tls,
                                                                   domains=["hopital.mssante.fr"])]})  # fmt: skip
    return running, running.app.smtp["smtp"].bound_port, pki


def mdn_settings(port: int, ca: Path, password: str = PASSWORD) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "mail_from": "mdn@relais.localhost", "username": USER,
            "password": password, "tls_ca": str(ca)}  # fmt: skip


def deliver(dest: Any, payload: bytes, content_type: str) -> Any:
    delivery = Delivery(str(uuid.uuid4()), str(uuid.uuid4()), "ch", dest.name, payload, content_type)
    return asyncio.run(dest.deliver(delivery))


def mails_at(running) -> list[bytes]:
    rows = running.store.query("SELECT payload_sha256 FROM relais_messages WHERE status = 'accepted'")
    return [running.store.payload(r["payload_sha256"]) for r in rows]


def test_smtp_destination_delivers_a_document_with_starttls_and_auth(relais, tmp_path: Path) -> None:
    target, port, pki = relay(relais, tmp_path)
    settings = {**mdn_settings(port, pki.ca), "to": ["secretariat@hopital.mssante.fr"]}
    dest = build_destination("relay", "smtp", settings, tmp_path)
    outcome = deliver(dest, b"%PDF-1.4 compte rendu", "application/pdf")
    assert outcome.detail.startswith("250 2.0.0 OK")
    message_id = uuid.UUID(outcome.detail.split()[-1])
    events = target.store.events_of(message_id)
    received = events[1].event
    assert received["account"] == USER and received["envelope_to"] == ["secretariat@hopital.mssante.fr"]
    doc = next(e.event for e in events if e.topic == "relais.DocumentSubmitted")
    assert target.store.payload(doc["payload"]["sha256"]) == b"%PDF-1.4 compte rendu"


def test_smtp_destination_failures_are_temporary_or_permanent(relais, tmp_path: Path) -> None:
    target, port, pki = relay(relais, tmp_path)
    wrong = build_destination("relay", "smtp", {**mdn_settings(port, pki.ca, "wrong"), "to": ["a@hopital.mssante.fr"]},
                              tmp_path)  # fmt: skip
    with pytest.raises(TemporaryFailure, match="AUTH refused"):
        deliver(wrong, b"x", "application/pdf")
    foreign = build_destination("relay", "smtp", {**mdn_settings(port, pki.ca), "to": ["a@elsewhere.example"]},
                                tmp_path)  # fmt: skip
    with pytest.raises(PermanentFailure, match="recipient refused"):
        deliver(foreign, b"x", "application/pdf")
    untrusted = build_destination("relay", "smtp", {**mdn_settings(port, pki.ca), "tls_ca": None,
                                                    "to": ["a@hopital.mssante.fr"]}, tmp_path)  # fmt: skip
    with pytest.raises(TemporaryFailure, match="SSL"):
        deliver(untrusted, b"x", "application/pdf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    down = build_destination("relay", "smtp", {**mdn_settings(closed_port, pki.ca), "to": ["a@b.c"]}, tmp_path)
    with pytest.raises(TemporaryFailure):
        deliver(down, b"x", "application/pdf")
    with pytest.raises(ValueError, match="mail_from"):
        validate_settings("smtp", {"host": "h", "mail_from": "not an address"}, tmp_path)
    assert mails_at(target) == []


def test_mdn_processed_reaches_the_sender_through_the_relay(relais, tmp_path: Path) -> None:
    target, relay_port, pki = relay(relais, tmp_path)
    source = relais(listeners={"mllp": [], "smtp": [smtp_listener(mdn=mdn_settings(relay_port, pki.ca))]})
    port = source.app.smtp["smtp"].bound_port
    mail = Mail(xdm=xdm_zip(), notify="dr.martin@hopital.mssante.fr").build()
    with session(port) as client:
        client.send_message(mail)
    mdn_raw = wait_for(lambda: mails_at(target), "the MDN at the relay")[0]
    mdn = email.message_from_bytes(mdn_raw, policy=email.policy.default)
    assert mdn.get_content_type() == "multipart/report"
    assert mdn.get_param("report-type") == "disposition-notification"
    assert str(mdn["To"]) == "dr.martin@hopital.mssante.fr"
    assert [p.get_content_type() for p in mdn.walk()][1:3] == ["text/plain", "message/disposition-notification"]
    text = mdn_raw.split(b"message/disposition-notification", 1)[1]
    assert b"Disposition: automatic-action/MDN-sent-automatically; processed" in text
    assert f"Original-Message-ID: {mail['Message-ID']}".encode() in text
    message_id = uuid.UUID(source.store.query("SELECT message_id FROM relais_messages")[0]["message_id"])
    topics = wait_for(
        lambda: (t := [e.topic for e in source.store.events_of(message_id)]) and "relais.Delivered" in t and t,
        "Delivered recorded",
    )
    assert topics[-3:] == ["relais.MdnQueued", "relais.DeliveryAttempted", "relais.Delivered"]


def test_mdn_reports_an_unreadable_archive_and_is_retried_until_the_relay_answers(relais, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        relay_port = s.getsockname()[1]
    pki = make_pki(tmp_path / "pki")
    source = relais(listeners={"mllp": [], "smtp": [smtp_listener(mdn=mdn_settings(relay_port, pki.ca))]})
    port = source.app.smtp["smtp"].bound_port
    with session(port) as client:
        client.send_message(Mail(xdm=b"PK\x03\x04 not really", notify="dr.martin@hopital.mssante.fr").build())
    message_id = uuid.UUID(source.store.query("SELECT message_id FROM relais_messages")[0]["message_id"])
    wait_for(lambda: any(e.topic == "relais.DeliveryFailed" for e in source.store.events_of(message_id)),
             "a failed attempt while the relay is down")  # fmt: skip
    # The relay comes up on the port the MDN waits for (its certificate from the same CA).
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    target = relais(listeners={"mllp": [], "smtp": [smtp_listener(port=relay_port, tls=tls,
                                                                  domains=["hopital.mssante.fr"])]})  # fmt: skip
    mdn_raw = wait_for(lambda: mails_at(target), "the MDN after a retry")[0]
    assert b"processed/error" in mdn_raw and b"Error: XDM-UNREADABLE" in mdn_raw
    events = source.store.events_of(message_id)
    queued = next(e.event for e in events if e.topic == "relais.MdnQueued")
    assert (queued["disposition"], queued["code"]) == ("failed", "XDM-UNREADABLE")
    wait_for(lambda: any(e.topic == "relais.Delivered" for e in source.store.events_of(message_id)), "Delivered")


def test_no_mdn_without_disposition_notification_to(relais, tmp_path: Path) -> None:
    target, relay_port, pki = relay(relais, tmp_path)
    source = relais(listeners={"mllp": [], "smtp": [smtp_listener(mdn=mdn_settings(relay_port, pki.ca))]})
    with session(source.app.smtp["smtp"].bound_port) as client:
        client.send_message(Mail(xdm=xdm_zip()).build())
        client.send_message(Mail(xdm=xdm_zip(), notify="dr.martin@hopital.mssante.fr").build())
    wait_for(lambda: mails_at(target), "the one MDN")
    assert len(source.store.query("SELECT * FROM relais_outbox")) == 1
    assert smtplib.SMTP  # the client library used throughout
