"""Channels that take mails, REST submissions and the documents they carry: end to end with
smtplib and httpx into Relais, out to a file drop, a second Relais playing the MSSanté relay
and a small HTTP receiver; misses recorded per channel; dry-run and route tests."""

from __future__ import annotations

import email
import email.policy
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.route_tools import dry_run, run_route_tests
from engine.routes import RouteError, load_channel, load_channels
from tests.conftest import wait_for
from tests.mail_samples import Doc, Mail, cda, xdm_zip
from tests.test_rest_api import CR_PDF, auth, document, http_listener, telemedicine
from tests.test_smtp_listener import session, smtp_listener
from tests.test_smtp_mdn import mails_at, mdn_settings, relay

RELAIS = str(Path(sys.executable).parent / "relais")
PDF = b"%PDF-1.4\n" + b"ordonnance " * 50


def write_routes(folder: Path, channels: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in channels.items():
        (folder / f"{name}.toml").write_text(text, encoding="utf-8")
    return folder


def events_of(running: Any, message_id: uuid.UUID) -> list[Any]:
    return running.store.events_of(message_id)


def decision(running: Any, message_id: uuid.UUID) -> Any:
    found = wait_for(
        lambda: [e for e in events_of(running, message_id) if e.topic in ("relais.MessageRouted", "relais.NotRouted")],
        "the routing decision",
    )
    assert len(found) == 1  # exactly once
    return found[0]


class Receiver:
    """A small HTTP server on loopback that keeps what it is sent."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, str], bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append((self.path, dict(self.headers.items()), body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_xdm_documents_of_a_mail_go_by_class_code_to_a_file_drop_and_a_relay(relais, tmp_path: Path) -> None:
    target, relay_port, pki = relay(relais, tmp_path)
    settings = mdn_settings(relay_port, pki.ca)
    smtp_dest = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    drop = tmp_path / "drop"
    routes = write_routes(
        tmp_path / "routes",
        {
            "10-documents": f"""
source.kinds = ["document"]
[filter]
all = [{{ metadata = "class_code", equals = "10" }}, {{ metadata = "X-MSS-CODECDA", exists = true }}]
[[destination]]
name = "drop"
type = "file"
settings = {{ folder = "{drop}", filename_template = "{{message_id}}-{{filename}}" }}
[[destination]]
name = "relay"
type = "smtp"
[destination.settings]
{smtp_dest}
to = ["secretariat@hopital.mssante.fr"]
""",
            "20-mail-archive": f"""
source.kinds = ["mail"]
filter = {{ metadata = "xdm", equals = "read" }}
[[destination]]
name = "archive"
type = "file"
settings = {{ folder = "{tmp_path / "archive"}", filename_template = "{{message_id}}.eml" }}
""",
            "30-lab-only": f"""
source.kinds = ["document"]
filter = {{ metadata = "type_code", equals = "11502-2" }}
[[destination]]
name = "lab"
type = "file"
settings = {{ folder = "{tmp_path / "lab"}" }}
""",
        },
    )
    source = relais(
        listeners={"mllp": [], "smtp": [smtp_listener()]}, routing={"enabled": True, "routes_dir": str(routes)}
    )
    report = cda()
    docs = [
        Doc(filename="CR0001.XML", data=report, class_code="10"),
        Doc(filename="ORDO0002.PDF", mime_type="application/pdf", data=PDF, class_code="11"),
    ]
    mail = Mail(xdm=xdm_zip(docs), headers={"X-MSS-INS": "O", "X-MSS-CODECDA": "11490-0"})
    with session(source.app.smtp["smtp"].bound_port) as client:
        client.send_message(mail.build())
    message_id = uuid.UUID(source.store.query("SELECT message_id FROM relais_messages")[0]["message_id"])

    routed = decision(source, message_id)
    assert routed.topic == "relais.MessageRouted"
    assert routed.event["channels"] == ["10-documents", "20-mail-archive"]
    submitted = [e.event for e in events_of(source, message_id) if e.topic == "relais.DocumentSubmitted"]
    first = next(d for d in submitted if d["filename"] == "CR0001.XML")
    by_dest = {d["destination"]: d for d in routed.event["deliveries"]}
    assert sorted(by_dest) == ["archive", "drop", "relay"]
    # The document's own stored payload is delivered: same hash, no copy.
    assert by_dest["drop"]["payload"] == first["payload"] == by_dest["relay"]["payload"]
    assert by_dest["drop"]["details"]["filename"] == "CR0001.XML"
    received = events_of(source, message_id)[0].event
    assert by_dest["archive"]["payload"] == received["payload"]

    dropped = wait_for(lambda: list(drop.glob("[!.]*")), "the document in the drop folder")
    assert [p.name for p in dropped] == [f"{message_id}-CR0001.XML"] and dropped[0].read_bytes() == report
    archived = wait_for(lambda: list((tmp_path / "archive").glob("*.eml")), "the mail in the archive")
    assert archived[0].read_bytes() == source.store.payload(received["payload"]["sha256"])
    assert not (tmp_path / "lab").exists()

    relayed = email.message_from_bytes(wait_for(lambda: mails_at(target), "the mail at the relay")[0],
                                       policy=email.policy.default)  # fmt: skip
    attachment = next(part for part in relayed.iter_attachments())
    assert attachment.get_filename() == "CR0001.XML" and attachment.get_content_type() == "text/xml"
    assert attachment.get_payload(decode=True) == report
    assert str(relayed["To"]) == "secretariat@hopital.mssante.fr"


def test_rest_documents_go_to_an_http_receiver_and_the_request_to_a_file(
    relais, tmp_path: Path, receiver: Receiver
) -> None:
    routes = write_routes(
        tmp_path / "routes",
        {
            "lab-reports": f"""
source = {{ kinds = ["document"], listeners = ["http"] }}
[filter]
all = [{{ metadata = "type_code", equals = "11502-2" }}, {{ metadata = "confidentiality", in = ["N", "R"] }}]
[[destination]]
name = "dpi"
type = "http"
settings = {{ url = "{receiver.url}/documents" }}
""",
            "requests": f"""
source.kinds = ["rest"]
filter = {{ metadata = "patient.ins", exists = true }}
[[destination]]
name = "journal"
type = "file"
settings = {{ folder = "{tmp_path / "journal"}", filename_template = "{{message_id}}.json" }}
""",
        },
    )
    running = relais(listeners={"mllp": [], "http": [http_listener()]},
                     routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    r = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))
    assert r.status_code == 202, r.text
    message_id = uuid.UUID(r.json()["id"])

    routed = decision(running, message_id)
    assert routed.topic == "relais.MessageRouted" and routed.event["channels"] == ["lab-reports", "requests"]
    path, headers, body = wait_for(lambda: receiver.received, "the document at the HTTP receiver")[0]
    assert path == "/documents" and body == CR_PDF
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Disposition"] == 'attachment; filename="cr.pdf"'
    dpi = next(d for d in routed.event["deliveries"] if d["destination"] == "dpi")
    assert headers["Idempotency-Key"] == dpi["delivery_id"]
    assert dpi["payload"]["sha256"] == hashlib.sha256(CR_PDF).hexdigest()

    journal = wait_for(lambda: list((tmp_path / "journal").glob("*.json")), "the request in the journal")
    request = json.loads(journal[0].read_bytes())
    assert request["documents"][0]["sha256"] == dpi["payload"]["sha256"] and "content" not in request["documents"][0]
    wait_for(
        lambda: httpx.get(f"{url}{r.headers['location']}", headers=auth("hospital")).json()["status"] == "delivered",
        "the submission's status: delivered",
    )


def test_filter_misses_of_a_submission_are_recorded_per_channel(relais, tmp_path: Path, receiver: Receiver) -> None:
    routes = write_routes(
        tmp_path / "routes",
        {
            "lab-reports": f"""
source.kinds = ["document"]
filter = {{ metadata = "type_code", equals = "11502-2" }}
[[destination]]
name = "dpi"
type = "http"
settings = {{ url = "{receiver.url}" }}
""",
            "urgent-requests": f"""
source.kinds = ["rest"]
filter = {{ not = {{ metadata = "urgency", equals = "urgent" }} }}
[[destination]]
name = "dpi"
type = "http"
settings = {{ url = "{receiver.url}" }}
""",
            "adt": f"""
[[destination]]
name = "dpi"
type = "http"
settings = {{ url = "{receiver.url}" }}
""",
        },
    )
    running = relais(listeners={"mllp": [], "http": [http_listener()]},
                     routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    r = httpx.post(f"{url}/v1/submissions", json=telemedicine(), headers=auth("doctor"))
    assert r.status_code == 202, r.text
    not_routed = decision(running, uuid.UUID(r.json()["id"]))
    assert not_routed.topic == "relais.NotRouted" and not_routed.event["reason"] == "no channel matched"
    assert not_routed.event["misses"] == {
        "lab-reports": "document[0]: filter (metadata type_code): value differs",
        "urgent-requests": "rest: filter.not: matched",
        "adt": "source kind 'rest' or 'document' not taken",
    }
    assert receiver.received == []
    status = httpx.get(f"{url}{r.headers['location']}", headers=auth("doctor")).json()
    assert status["status"] == "not_routed"


def test_routes_try_and_route_tests_cover_documents(relais, tmp_path: Path) -> None:
    running = relais(listeners={"mllp": [], "smtp": [smtp_listener()]})
    port = running.app.smtp["smtp"].bound_port
    with session(port) as client:
        for class_code in ("10", "11", "10"):
            client.send_message(Mail(xdm=xdm_zip([Doc(data=cda(), class_code=class_code)])).build())
        client.send_message(Mail(attachments=[("ordo.pdf", "application/pdf", PDF)]).build())
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(
        'source.kinds = ["document"]\nfilter = { metadata = "class_code", equals = "10" }\n'
        '[[destination]]\nname = "drop"\ntype = "file"\nsettings = { folder = "never" }\n'
        '[[test]]\nname = "a class 10 document"\nkind = "document"\nmetadata = { class_code = "10" }\n'
        'expect_destinations = ["drop"]\n'
        '[[test]]\nname = "a plain attachment"\nkind = "document"\nmetadata = { document_source = "attachment" }\n'
        "expect_destinations = []\n",
        encoding="utf-8",
    )
    home = running.config.base_dir
    (home / "config.toml").write_text(
        '[store]\nurl = "sqlite:///relais.db"\nblob_dir = "blobs"\n[routing]\nenabled = false\n', encoding="utf-8"
    )
    out = subprocess.run([RELAIS, "--config", str(home / "config.toml"), "routes", "try", str(candidate), "--since",
                          "2000-01-01"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "messages examined: 4, routed: 2, not routed: 2" in out.stdout and "drop: 2" in out.stdout
    report = dry_run(running.store, load_channel(candidate), "2000-01-01")
    assert (report.examined, report.routed, dict(report.per_destination)) == (4, 2, {"drop": 2})
    assert report.misses == {"document[0]: filter (metadata class_code): value differs": 2}
    assert not (tmp_path / "never").exists()
    outcomes = run_route_tests(load_channels(tmp_path))
    assert [(o.name, o.ok) for o in outcomes] == [("a class 10 document", True), ("a plain attachment", True)]


def test_transforms_on_a_channel_without_hl7_are_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "docs.toml"
    path.write_text(
        'source.kinds = ["document", "mail"]\n[[transform]]\nset = "MSH-5"\nvalue = "X"\n'
        '[[destination]]\nname = "d"\ntype = "file"\nsettings = { folder = "out" }\n',
        encoding="utf-8",
    )
    with pytest.raises(RouteError, match=r"docs\.toml.*transform.*takes no HL7 message"):
        load_channel(path)
    out = subprocess.run([RELAIS, "routes", "check", "--routes", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert out.returncode == 1 and "takes no HL7 message" in out.stderr


def test_documents_are_routed_and_named_on_a_postgresql_store(relais, tmp_path: Path, pg_url: str) -> None:
    drop = tmp_path / "drop"
    routes = write_routes(
        tmp_path / "routes",
        {
            "documents": f"""
source.kinds = ["document"]
filter = {{ identifier_authority = "1.2.250.1.213.1.4.8" }}
[[destination]]
name = "drop"
type = "file"
settings = {{ folder = "{drop}", filename_template = "{{filename}}" }}
"""
        },
    )
    running = relais(listeners={"mllp": [], "http": [http_listener()]}, store={"url": pg_url, "blob_dir": "blobs"},
                     routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    r = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))
    assert r.status_code == 202, r.text
    assert decision(running, uuid.UUID(r.json()["id"])).topic == "relais.MessageRouted"
    dropped = wait_for(lambda: list(drop.glob("[!.]*")), "the document in the drop folder")
    assert [p.name for p in dropped] == ["cr.pdf"] and dropped[0].read_bytes() == CR_PDF


def test_a_mail_whose_documents_were_refused_goes_to_quarantine_and_survives_a_restart(relais, tmp_path: Path) -> None:
    quarantine = tmp_path / "quarantine"
    routes = write_routes(
        tmp_path / "routes",
        {
            "documents": f"""
source.kinds = ["document"]
[[destination]]
name = "dpi"
type = "file"
settings = {{ folder = "{tmp_path / "dpi"}" }}
""",
            "quarantine": f"""
source.kinds = ["mail"]
filter = {{ metadata = "integration_error", in = ["INS-MISMATCH", "INS-MISSING", "XDM-UNREADABLE"] }}
[[destination]]
name = "quarantine"
type = "file"
settings = {{ folder = "{quarantine}", filename_template = "{{message_id}}.eml" }}
""",
        },
    )
    config = {"listeners": {"mllp": [], "smtp": [smtp_listener()]},
              "routing": {"enabled": True, "routes_dir": str(routes)}}  # fmt: skip
    running = relais(**config)
    other_patient = Mail(xdm=xdm_zip([Doc(data=cda(ins="180000000000000"))]))
    with session(running.app.smtp["smtp"].bound_port) as client:
        client.send_message(other_patient.build())
    message_id = uuid.UUID(running.store.query("SELECT message_id FROM relais_messages")[0]["message_id"])
    routed = decision(running, message_id)
    assert routed.event["channels"] == ["quarantine"]
    wait_for(lambda: list(quarantine.glob("*.eml")), "the mail in quarantine")
    assert not (tmp_path / "dpi").exists()
    # The same data folder started again: the mail is not routed a second time.
    home = running.config.base_dir
    running.stop()
    from tests.conftest import make_config, start_relais

    again = start_relais(make_config(home, **config))
    try:
        # A later mail routed means the router is past the first one (it follows log order).
        with session(again.app.smtp["smtp"].bound_port) as client:
            client.send_message(Mail(xdm=xdm_zip([Doc(data=cda(ins="180000000000000"))])).build())
        later = again.store.query("SELECT message_id FROM relais_messages WHERE message_id <> ?", [str(message_id)])
        assert decision(again, uuid.UUID(later[0]["message_id"])).event["channels"] == ["quarantine"]
        wait_for(lambda: len(list(quarantine.glob("*.eml"))) == 2, "the later mail in quarantine")
        assert [e.topic for e in again.store.events_of(message_id)].count("relais.MessageRouted") == 1
    finally:
        again.stop()


def test_a_refused_mail_is_never_routed_and_a_plain_attachment_is_a_document(relais, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    routes = write_routes(
        tmp_path / "routes",
        {
            "everything": f"""
source.kinds = ["mail", "document"]
[[destination]]
name = "drop"
type = "file"
settings = {{ folder = "{drop}", filename_template = "{{filename}}" }}
"""
        },
    )
    running = relais(listeners={"mllp": [], "smtp": [smtp_listener(max_message_bytes=200_000)]},
                     routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    big = Mail(attachments=[("scan.pdf", "application/pdf", b"%PDF-1.4\n" + b"x" * 400_000)])
    with session(running.app.smtp["smtp"].bound_port) as client:
        small = Mail(attachments=[("ordo.pdf", "application/pdf", PDF)])
        assert client.sendmail(small.sender, small.to, small.bytes()) == {}
        client.mail(big.sender)  # no SIZE announced: the limit is found in DATA
        client.rcpt(big.to[0])
        code, _ = client.data(big.bytes())
        assert code == 552
    rows = running.store.query("SELECT message_id, status FROM relais_messages ORDER BY received_at")
    assert [r["status"] for r in rows] == ["accepted", "reject"]
    routed = decision(running, uuid.UUID(rows[0]["message_id"]))
    # The mail (no file name: its delivery id) and its attachment (its own name) are dropped.
    assert sorted(d["details"]["kind"] for d in routed.event["deliveries"]) == ["document", "mail"]
    # Delivered files only: the file destination writes a hidden temp file, then renames it.
    wait_for(lambda: len(list(drop.glob("[!.]*"))) == 2, "the mail and its attachment in the drop folder")
    assert (drop / "ordo.pdf").read_bytes() == PDF
    # A refused mail (here a 552, recorded with its first bytes) gets no routing decision.
    assert not [e for e in events_of(running, uuid.UUID(rows[1]["message_id"])) if "Routed" in e.topic]
