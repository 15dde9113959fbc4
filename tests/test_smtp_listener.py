"""MSSanté SMTP listener, tried with real clients (smtplib, swaks) on loopback: STARTTLS and
AUTH required, recipients checked, size limit, 250 only once the mail is committed."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest

from connectors.smtp import hash_password
from event_store.events import DocumentSubmitted
from tests.mail_samples import Doc, Mail, cda, xdm_zip

USER, PASSWORD = "cr-chu@hopital.mssante.fr", "correct horse battery staple"
PASSWORD_HASH = hash_password(PASSWORD, n=2**12)


def smtp_listener(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "smtp",
        "port": 0,
        "domains": ["relais.localhost", "patient.mssante.fr"],
        "accounts": [{"user": USER, "password_hash": PASSWORD_HASH}],
        **overrides,
    }


def start(relais, **overrides: Any):
    running = relais(listeners={"mllp": [], "smtp": [smtp_listener(**overrides)]})
    return running, running.app.smtp["smtp"].bound_port


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the development certificate is self-signed
    return ctx


def session(port: int, *, login: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("hopital.example")
    client.starttls(context=client_tls())
    client.ehlo("hopital.example")
    if login:
        client.login(USER, PASSWORD)
    return client


def message_id_of(reply: bytes) -> uuid.UUID:
    return uuid.UUID(reply.decode().split()[-1])


def send(client: smtplib.SMTP, mail: Mail) -> tuple[int, bytes, bytes]:
    raw = mail.bytes()
    client.mail(mail.sender)
    for rcpt in mail.to:
        code, _ = client.rcpt(rcpt)
        assert code == 250
    code, reply = client.data(raw)
    return code, reply, raw


def test_mail_gets_250_only_with_its_events_committed(relais) -> None:
    running, port = start(relais)
    mail = Mail(xdm=xdm_zip(), headers={"X-MSS-INS": "O", "X-MSS-CODECDA": "11490-0"})
    with session(port) as client:
        code, reply, raw = send(client, mail)
    assert code == 250 and reply.startswith(b"2.0.0 OK")
    message_id = message_id_of(reply)
    events = running.store.events_of(message_id)
    assert [e.topic for e in events] == ["relais.MessageReceived", "relais.MailReceived", "relais.DocumentSubmitted"]
    received, mail_event, document = (e.event for e in events)
    assert received["protocol"] == "smtp" and received["payload"]["content_type"] == "message/rfc822"
    assert running.store.payload(received["payload"]["sha256"]) == raw
    assert mail_event["account"] == USER and mail_event["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert mail_event["envelope_to"] == ["secretariat@relais.localhost"]
    assert mail_event["mss_headers"] == {"X-MSS-INS": "O", "X-MSS-CODECDA": "11490-0"}
    assert mail_event["xdm"] == "read"
    assert document["patient_id"] == "260058815400233" and document["type_code"] == "11490-0"
    assert running.store.payload(document["payload"]["sha256"]) == cda()
    assert received["metadata"]["patient_identifiers"][0]["id"] == "260058815400233"


def test_plain_text_session_must_start_tls_first(relais) -> None:
    _, port = start(relais)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("hopital.example")
        assert "auth" not in client.esmtp_features  # no password over plain text
        assert client.has_extn("starttls")
        code, reply = client.mail("dr.martin@hopital.mssante.fr")
        assert code == 530 and b"STARTTLS" in reply


def test_mail_without_auth_gets_530_and_a_wrong_password_535(relais) -> None:
    _, port = start(relais)
    with session(port, login=False) as client:
        code, _ = client.mail("dr.martin@hopital.mssante.fr")
        assert code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(USER, "wrong password")
        assert failed.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody@example.org", PASSWORD)


def test_tls_below_1_2_is_refused(relais) -> None:
    _, port = start(relais)
    ctx = client_tls()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("hopital.example")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=ctx)


def test_unknown_mailbox_gets_550_5_1_1_and_foreign_domain_550_5_7_1(relais) -> None:
    _, port = start(relais, mailboxes=["secretariat@relais.localhost"])
    with session(port) as client:
        client.mail("dr.martin@hopital.mssante.fr")
        code, reply = client.rcpt("nobody@relais.localhost")
        assert (code, reply[:5]) == (550, b"5.1.1")
        code, reply = client.rcpt("someone@elsewhere.example")
        assert (code, reply[:5]) == (550, b"5.7.1")
        assert client.rcpt("secretariat@relais.localhost")[0] == 250


def test_oversized_mail_gets_552_and_the_refusal_is_recorded(relais) -> None:
    running, port = start(relais, max_message_bytes=200_000)
    big = Mail(attachments=[("scan.pdf", "application/pdf", b"%PDF-1.4\n" + b"x" * 400_000)])
    with session(port) as client:
        code, reply, _ = send(client, big)
        assert code == 552 and reply.startswith(b"5.3.4")
        assert b"Traceback" not in reply
        # the session goes on: a mail within the limit is still taken
        code, reply, _ = send(client, Mail())
        assert code == 250
    rows = running.store.query("SELECT * FROM relais_messages WHERE status = 'reject'")
    assert len(rows) == 1 and rows[0]["ack_code"] == "552" and rows[0]["error_code"] == "5.3.4"


def test_store_unavailable_gets_451_without_internal_detail(relais) -> None:
    running, port = start(relais)
    with session(port) as client:
        running.loop_call(running.app.ingestor.stop())
        code, reply, _ = send(client, Mail())
    assert code == 451 and reply.startswith(b"4.3.0")
    assert b"Error" not in reply and b"ingest" not in reply


def test_resent_mail_gets_the_same_message_id(relais) -> None:
    running, port = start(relais)
    mail = Mail(xdm=xdm_zip())
    raw = mail.bytes()
    with session(port) as client:
        first = client.sendmail(mail.sender, mail.to, raw)
        assert first == {}
        assert client.noop()[0] == 250
    with session(port) as client:
        client.mail(mail.sender)
        client.rcpt(mail.to[0])
        code_a, reply_a = client.data(raw)
        client.mail(mail.sender)
        client.rcpt(mail.to[0])
        code_b, reply_b = client.data(raw)
    assert code_a == code_b == 250 and message_id_of(reply_a) == message_id_of(reply_b)
    topics = [e.topic for e in running.store.events_of(message_id_of(reply_a))]
    assert topics.count("relais.DuplicateReceived") == 2


def test_dot_stuffing_is_undone_and_a_bare_lf_dot_does_not_end_the_mail(relais) -> None:
    running, port = start(relais)
    body = (
        b"From: a@hopital.mssante.fr\r\nTo: secretariat@relais.localhost\r\nSubject: dots\r\n\r\n"
        b"..leading dot\r\n"
        b"smuggled?\n.\nMAIL FROM:<evil@example.org>\r\n"
        b"end\r\n"
    )
    with session(port) as client:
        client.mail("a@hopital.mssante.fr")
        client.rcpt("secretariat@relais.localhost")
        assert client.docmd("DATA")[0] == 354
        client.send(body + b".\r\n")
        code, reply = client.getreply()
        assert code == 250
        assert client.noop()[0] == 250  # one mail, the session is in step
    payload = running.store.payload(running.store.events_of(message_id_of(reply))[0].event["payload"]["sha256"])
    assert b"\r\n.leading dot\r\n" in payload and b"smuggled?\n.\nMAIL FROM" in payload
    assert len(running.store.query("SELECT * FROM relais_messages")) == 1


def test_idle_client_is_disconnected_after_the_timeout(relais) -> None:
    _, port = start(relais, timeout=0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        banner = sock.recv(1024)
        assert banner.startswith(b"220 ")
        rest = b""
        while chunk := sock.recv(1024):  # the server closes; recv then returns b""
            rest += chunk
    assert b"250" not in rest


def test_plain_attachments_become_documents(relais) -> None:
    running, port = start(relais)
    mail = Mail(to=["260058815400233@patient.mssante.fr"],
                attachments=[("resultats.pdf", "application/pdf", b"%PDF-1.4 resultats")])  # fmt: skip
    with session(port) as client:
        code, reply, _ = send(client, mail)
    assert code == 250
    docs = [e.event for e in running.store.events_of(message_id_of(reply)) if e.topic == "relais.DocumentSubmitted"]
    assert len(docs) == 1 and docs[0]["source"] == "attachment" and docs[0]["filename"] == "resultats.pdf"
    assert docs[0]["patient_id"] == "260058815400233"
    assert running.store.payload(docs[0]["payload"]["sha256"]) == b"%PDF-1.4 resultats"


def test_xdm_with_another_patient_is_stored_with_an_integration_error(relais) -> None:
    running, port = start(relais)
    mail = Mail(xdm=xdm_zip([Doc(data=cda(ins="180000000000000"))]))
    with session(port) as client:
        code, reply, _ = send(client, mail)
    assert code == 250  # the mail is kept; the sender hears of the problem by MDN
    events = running.store.events_of(message_id_of(reply))
    topics = [e.topic for e in events]
    assert "relais.DocumentSubmitted" not in topics and topics[-1] == "relais.MailIntegrationFailed"
    assert events[-1].event["code"] == "INS-MISMATCH"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt install swaks)")
def test_swaks_delivers_an_xdm_mail(relais, tmp_path: Path) -> None:
    running, port = start(relais)
    archive = tmp_path / "IHE_XDM.ZIP"
    archive.write_bytes(xdm_zip([Doc(data=cda()), Doc(filename="DOC0002.PDF", mime_type="application/pdf",
                                                      data=b"%PDF-1.4 cr")]))  # fmt: skip
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--tls-protocol", "tlsv1_2,tlsv1_3",
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", "dr.martin@hopital.mssante.fr", "--to", "secretariat@relais.localhost",
         "--header", "X-MSS-INS: O", "--attach-type", "application/zip", "--attach-name", "IHE_XDM.ZIP",
         "--attach", f"@{archive}", "--helo", "hopital.example"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    line = next(li for li in result.stdout.splitlines() if "<~  250 2.0.0 OK" in li)
    message_id = uuid.UUID(line.split()[-1])
    docs = [e.event for e in running.store.events_of(message_id) if e.topic == "relais.DocumentSubmitted"]
    assert [d["filename"] for d in docs] == ["DOC0001.XML", "DOC0002.PDF"]
    assert DocumentSubmitted.__name__ == "DocumentSubmitted"


def test_mails_read_in_reader_processes_give_the_same_events(relais) -> None:
    running, port = start(relais, readers=1)
    with session(port) as client:
        code, reply, _ = send(client, Mail(xdm=xdm_zip()))
        bad_code, bad_reply, _ = send(client, Mail(xdm=b"PK\x03\x04 broken"))
    assert code == bad_code == 250
    topics = [e.topic for e in running.store.events_of(message_id_of(reply))]
    assert topics == ["relais.MessageReceived", "relais.MailReceived", "relais.DocumentSubmitted"]
    assert running.store.events_of(message_id_of(bad_reply))[-1].event["code"] == "XDM-UNREADABLE"


def _open_data(port: int) -> smtplib.SMTP:
    client = session(port)
    client.mail("dr.martin@hopital.mssante.fr")
    client.rcpt("secretariat@relais.localhost")
    assert client.docmd("DATA")[0] == 354
    return client


def _wait_for_rejection(running) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = running.store.query("SELECT * FROM relais_messages WHERE status = 'reject'")
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError("the cut-off mail was not recorded")


def test_mail_cut_off_mid_data_is_recorded_as_refused_with_its_bytes(relais) -> None:
    running, port = start(relais)
    client = _open_data(port)
    partial = b"Subject: cut\r\n\r\n" + b"x" * 5000 + b"\r\n"
    client.send(partial)
    client.close()  # no <CRLF>.<CRLF>: the client never got a 250
    row = _wait_for_rejection(running)
    assert row["error_code"] == "cut-off"
    assert running.store.payload(row["payload_sha256"]) == partial


def test_client_idle_mid_data_is_disconnected_and_its_mail_recorded_as_refused(relais) -> None:
    running, port = start(relais, timeout=0.5)
    client = _open_data(port)
    client.send(b"Subject: slow\r\n\r\nfirst line\r\n")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.getreply()  # the server closes the idle session without answering
    row = _wait_for_rejection(running)
    assert row["error_code"] == "cut-off" and running.store.payload(row["payload_sha256"]).endswith(b"first line\r\n")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt install swaks)")
def test_swaks_sees_535_for_a_wrong_password_and_550_for_an_unknown_mailbox(relais) -> None:
    _, port = start(relais, mailboxes=["secretariat@relais.localhost"])
    base = ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "LOGIN", "--auth-user", USER,
            "--from", "dr.martin@hopital.mssante.fr", "--helo", "hopital.example"]  # fmt: skip
    wrong = subprocess.run([*base, "--auth-password", "wrong", "--to", "secretariat@relais.localhost"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode != 0 and "<~* 535" in wrong.stdout
    unknown = subprocess.run([*base, "--auth-password", PASSWORD, "--to", "nobody@relais.localhost"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unknown.returncode != 0 and "<~* 550 5.1.1" in unknown.stdout


def test_a_peer_that_keeps_failing_auth_is_refused_for_a_while(relais) -> None:
    _, port = start(relais)
    with session(port, login=False) as client:
        for _ in range(5):  # smtplib tries PLAIN then LOGIN: two failures per login()
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                client.login(USER, "guess")
            assert failed.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError) as locked:
            client.login(USER, PASSWORD)  # even the right password, without computing any hash
        assert locked.value.smtp_code == 454


def test_a_mail_the_reader_cannot_handle_is_still_kept_with_its_failure() -> None:
    from engine.mail_intake import unreadable_mail

    reading = unreadable_mail(["secretariat@relais.localhost"], "RecursionError")
    assert [type(e).__name__ for e in reading.events] == ["MailReceived", "MailIntegrationFailed"]
    assert reading.failure is not None and reading.failure[0] == "MAIL-UNREADABLE"


def test_relais_check_covers_the_documents_of_a_mail(relais) -> None:
    from event_store.integrity import check_payloads

    store = {"url": "sqlite:///relais.db", "blob_dir": "blobs", "inline_payload_limit": 1024}
    running = relais(listeners={"mllp": [], "smtp": [smtp_listener()]}, store=store)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    mail = Mail(xdm=xdm_zip([Doc(data=cda()), Doc(filename="DOC0002.PDF", mime_type="application/pdf", data=pdf)]))
    with session(running.app.smtp["smtp"].bound_port) as client:
        code, reply, _ = send(client, mail)
    assert code == 250
    report = check_payloads(running.store)
    assert report.referenced == 3 and report.missing == [] and report.orphans == []  # mail + 2 documents
    doc = [e.event for e in running.store.events_of(message_id_of(reply)) if e.topic == "relais.DocumentSubmitted"][1]
    running.store.blobs.path_of(doc["payload"]["sha256"]).unlink()
    assert check_payloads(running.store).missing == [doc["payload"]["sha256"]]


def test_peers_outside_the_allow_list_get_554_and_excess_connections_421(relais) -> None:
    _, port = start(relais, allowed_peers=["10.0.0.0/8"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert sock.recv(1024).startswith(b"554 5.7.1")
    _, port = start(relais, max_connections=2)
    first, second = session(port), session(port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert sock.recv(1024).startswith(b"421 4.7.0")
        second.quit()
        for _ in range(200):  # a place is free again once the server has seen the close
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                if sock.recv(1024).startswith(b"220 "):
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the place of a closed session was not freed")
    finally:
        first.close()
        second.close()


def test_end_of_data_split_across_reads_is_found(relais) -> None:
    running, port = start(relais)
    with session(port) as client:
        client.mail("a@hopital.mssante.fr")
        client.rcpt("secretariat@relais.localhost")
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: split\r\n\r\nbody\r\n.")
        time.sleep(0.05)  # let the server read the first part on its own
        client.send(b"\r\n")
        code, reply = client.getreply()
        assert code == 250
    payload = running.store.payload(running.store.events_of(message_id_of(reply))[0].event["payload"]["sha256"])
    assert payload == b"Subject: split\r\n\r\nbody\r\n"
