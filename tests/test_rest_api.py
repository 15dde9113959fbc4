"""The REST API with httpx against a running Relais: submissions, idempotent resends, bad
input answered with problem+json naming the field (and kept as rejected messages), roles."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from connectors.rest import token_digest
from tests.conftest import RunningRelais, adt

TOKENS = {
    "hospital": ("tok-hospital-3f9a", ["sender"]),
    "clinic": ("tok-clinic-77b1", ["sender"]),
    "doctor": ("tok-doctor-0c2e", ["professional"]),
    "auditor": ("tok-auditor-9d41", ["auditor"]),
}
CR_PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40  # a document of ~10 KB


def http_listener(**extra: Any) -> dict[str, Any]:
    tokens = [{"name": name, "sha256": token_digest(tok), "roles": roles} for name, (tok, roles) in TOKENS.items()]
    return {"name": "http", "port": 0, "tokens": tokens, **extra}


def start(relais: Callable[..., RunningRelais], **extra: Any) -> tuple[RunningRelais, str]:
    running = relais(listeners={"mllp": [], "http": [http_listener(**extra)]})
    return running, f"http://127.0.0.1:{running.app.port_of('http')}"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def document(content: bytes = CR_PDF, **patient: str) -> dict[str, Any]:
    return {
        "kind": "document",
        "patient": patient or {"ins": "260058815400233", "local_id": "123456", "local_authority": "1.2.250.1.71.4.2.2"},
        "author": {"rpps": "10001234567", "name": "Dr Exemple"},
        "author_institution": "690000001",
        "documents": [
            {
                "filename": "cr.pdf",
                "content_type": "application/pdf",
                "type_code": "11502-2",
                "title": "Compte rendu de biologie",
                "content": base64.b64encode(content).decode(),
            }
        ],
    }


def telemedicine() -> dict[str, Any]:
    return {
        "kind": "telemedicine",
        "requester": {"rpps": "10001234567"},
        "expert": {"rpps": "10007654321", "organisation": "690000002"},
        "patient": {"ins": "260058815400233"},
        "reason": "avis cardiologique sur ECG",
        "urgency": "urgent",
        "documents": [{"filename": "ecg.pdf", "content_type": "application/pdf", "content": "JVBERi0xLjQK"}],
    }


@pytest.fixture
def api(relais: Callable[..., RunningRelais]) -> tuple[RunningRelais, str]:
    return start(relais)


def test_a_document_is_accepted_after_commit_and_its_status_can_be_followed(api) -> None:
    running, url = api
    with httpx.Client(base_url=url, headers=auth("hospital")) as client:
        r = client.post("/v1/submissions", json=document())
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/messages/{message_id}"
        status = client.get(r.headers["location"])
    assert status.status_code == 200
    view = status.json()
    assert view["protocol"] == "rest" and view["status"] == "accepted"
    assert [e["topic"] for e in view["events"]] == ["relais.MessageReceived", "relais.SubmissionAccepted"]
    accepted = view["events"][1]["fields"]
    assert accepted["kind"] == "document" and accepted["client"] == "hospital"
    ref = accepted["documents"][0]
    assert running.store.payload(ref["sha256"]) == CR_PDF  # the document itself, stored by its hash
    received = view["events"][0]["fields"]["metadata"]
    assert received["patient_identifiers"][0]["id"] == "260058815400233"


def test_a_telemedicine_request_by_a_professional(api) -> None:
    _, url = api
    r = httpx.post(f"{url}/v1/submissions", json=telemedicine(), headers=auth("doctor"))
    assert r.status_code == 202, r.text
    view = httpx.get(f"{url}{r.headers['location']}", headers=auth("doctor")).json()
    fields = view["events"][1]["fields"]
    assert fields["kind"] == "telemedicine" and fields["details"]["expert"]["rpps"] == "10007654321"


def test_a_document_sent_as_multipart_is_the_same_submission_as_base64(api) -> None:
    """Same Idempotency-Key, same content, other encoding: recognised as a resend."""
    _running, url = api
    key = str(uuid.uuid4())
    headers = {**auth("hospital"), "Idempotency-Key": key}
    first = httpx.post(f"{url}/v1/submissions", json=document(), headers=headers)
    meta = document()
    del meta["documents"][0]["content"]
    meta["documents"][0]["part"] = "file0"
    again = httpx.post(
        f"{url}/v1/submissions",
        headers=headers,
        files={
            "metadata": (None, json.dumps(meta), "application/json"),
            "file0": ("cr.pdf", CR_PDF, "application/pdf"),
        },
    )
    assert first.status_code == 202 and again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    assert again.headers["idempotent-replayed"] == "true"


def test_resend_with_same_idempotency_key_answers_the_original_and_is_recorded(api) -> None:
    running, url = api
    headers = {**auth("hospital"), "Idempotency-Key": "order-42"}
    first = httpx.post(f"{url}/v1/submissions", json=document(), headers=headers)
    again = httpx.post(f"{url}/v1/submissions", json=document(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["received_at"] == first.json()["received_at"]
    topics = [e.topic for e in running.store.events_of(uuid.UUID(first.json()["id"]))]
    assert topics.count("relais.DuplicateReceived") == 1
    assert running.store.query("SELECT COUNT(*) AS n FROM relais_messages")[0]["n"] == 1
    # The same key from another client is that client's own key.
    other = httpx.post(
        f"{url}/v1/submissions", json=document(), headers={**auth("clinic"), "Idempotency-Key": "order-42"}
    )
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_same_idempotency_key_with_another_body_is_refused_naming_the_header(api) -> None:
    running, url = api
    headers = {**auth("hospital"), "Idempotency-Key": "order-43"}
    first = httpx.post(f"{url}/v1/submissions", json=document(), headers=headers)
    other = httpx.post(f"{url}/v1/submissions", json=document(b"another report"), headers=headers)
    assert first.status_code == 202
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    rejected = running.store.events_of(uuid.UUID(other.json()["message_id"]))
    assert [e.topic for e in rejected] == ["relais.MessageReceived", "relais.MessageRejected"]
    accepted = running.store.query("SELECT COUNT(*) AS n FROM relais_messages WHERE status = 'accepted'")
    assert accepted[0]["n"] == 1
    # Both answers stay what they were on a resend.
    assert httpx.post(f"{url}/v1/submissions", json=document(), headers=headers).json()["id"] == first.json()["id"]
    again = httpx.post(f"{url}/v1/submissions", json=document(b"another report"), headers=headers)
    assert again.status_code == 422 and again.json()["message_id"] == other.json()["message_id"]


def test_concurrent_submissions_under_one_key_accept_exactly_one(api) -> None:
    """The key is checked by the single writer, so racing requests cannot both get in."""
    import asyncio

    running, url = api
    headers = {**auth("hospital"), "Idempotency-Key": "race-1"}

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            bodies = [document(f"report {i}".encode()) for i in range(6)]
            return await asyncio.gather(*(client.post("/v1/submissions", json=b) for b in bodies))

    answers = asyncio.run(race())
    assert sorted(r.status_code for r in answers) == [202] + [422] * 5
    rows = running.store.query("SELECT status FROM relais_messages WHERE control_id = 'race-1'")
    assert sorted(r["status"] for r in rows) == ["accepted"] + ["reject"] * 5


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"kind": "document", "patient": ', 400, "body"),
        (b'{"kind": "letter"}', 422, "kind"),
        (b'{"kind": "document", "patient": {"ins": "12"}, "documents": []}', 422, "patient.ins"),
        (b'{"kind": "document", "patient": {"ins": "260058815400234"}, "documents": []}', 422, "patient.ins"),
    ],
)
def test_malformed_or_invalid_json_names_the_field_and_is_recorded(api, body: bytes, status: int, field: str) -> None:
    running, url = api
    r = httpx.post(
        f"{url}/v1/submissions", content=body, headers={**auth("hospital"), "Content-Type": "application/json"}
    )
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and field in [e["field"] for e in problem["errors"]]
    events = running.store.events_of(uuid.UUID(problem["message_id"]))
    assert events[-1].topic == "relais.MessageRejected" and events[-1].event["code"] == str(status)
    assert running.store.payload(events[0].event["payload"]["sha256"]) == body  # kept as sent


def test_an_ins_born_in_corsica_is_accepted(api) -> None:
    _, url = api
    from engine.rest_intake import ins_key

    corsican = "1850".ljust(5, "6") + "2A" + "004123"
    r = httpx.post(f"{url}/v1/submissions", json=document(ins=corsican + ins_key(corsican)), headers=auth("hospital"))
    assert r.status_code == 202, r.text


def test_bad_base64_names_the_document(api) -> None:
    _, url = api
    bad = document()
    bad["documents"][0]["content"] = "not base64 at all!!"
    r = httpx.post(f"{url}/v1/submissions", json=bad, headers=auth("hospital"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "documents[0].content"


def test_unidentified_patient_and_missing_part_are_refused(api) -> None:
    _, url = api
    r = httpx.post(f"{url}/v1/submissions", json=document(local_authority="x"), headers=auth("hospital"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "patient"
    missing = document()
    missing["documents"][0] = {"filename": "a.pdf", "part": "nowhere"}
    r = httpx.post(f"{url}/v1/submissions", json=missing, headers=auth("hospital"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "documents[0].part"


def test_wrong_content_type_is_415(api) -> None:
    _, url = api
    r = httpx.post(f"{url}/v1/submissions", content=b"<xml/>", headers={**auth("hospital"), "Content-Type": "text/xml"})
    assert r.status_code == 415 and r.json()["errors"][0]["field"] == "Content-Type"


def test_oversized_body_is_413_and_recorded(relais) -> None:
    running, url = start(relais, max_body_bytes=20_000)
    r = httpx.post(f"{url}/v1/submissions", json=document(CR_PDF * 3), headers=auth("hospital"))
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    rows = running.store.query("SELECT message_id, status, ack_code FROM relais_messages")
    assert [(row["status"], row["ack_code"]) for row in rows] == [("reject", "413")]
    # The problem names the record of the refusal, which the sender may look up.
    assert r.json()["message_id"] == rows[0]["message_id"]
    seen = httpx.get(f"{url}/v1/messages/{r.json()['message_id']}", headers=auth("hospital"))
    assert seen.status_code == 200 and seen.json()["status"] == "rejected"
    # Same with a chunked body that declares no length.
    chunks = (CR_PDF for _ in range(3))
    r = httpx.post(
        f"{url}/v1/submissions", content=chunks, headers={**auth("hospital"), "Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_an_oversized_hl7_body_is_413_quoting_its_record(relais) -> None:
    running, url = start(relais, max_body_bytes=2_000)
    message = adt(control_id="BIG-1") + "NTE|1||" + "x" * 5_000 + "\r"
    headers = {**auth("hospital"), "Content-Type": "application/hl7-v2"}
    r = httpx.post(f"{url}/v1/hl7", content=message.encode(), headers=headers)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    rows = running.store.query("SELECT message_id, status, protocol, reason FROM relais_messages")
    assert [(row["status"], row["protocol"]) for row in rows] == [("reject", "http-hl7")]
    assert "larger than 2000 bytes" in rows[0]["reason"]
    assert r.json()["message_id"] == rows[0]["message_id"]
    seen = httpx.get(f"{url}/v1/messages/{rows[0]['message_id']}", headers=auth("hospital"))
    assert seen.status_code == 200 and seen.json()["status"] == "rejected"


def test_a_body_that_stops_arriving_gets_408(relais) -> None:
    """A slow (or stalled) sender cannot hold a request open forever."""
    _, url = start(relais, body_timeout=0.5)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/submissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKENS['hospital'][0]}\r\n".encode()
            + b'Content-Length: 1000\r\n\r\n{"kind": '
        )
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"application/problem+json" in answer


def test_a_truncated_body_is_kept_as_a_rejected_message(relais) -> None:
    running, url = start(relais)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/submissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKENS['hospital'][0]}\r\n".encode()
            + b'Content-Length: 1000\r\n\r\n{"kind": "document"'
        )
    for _ in range(100):  # the server notices the close on its own; wait for the record
        rows = running.store.query("SELECT status, reason FROM relais_messages")
        if rows:
            break
        time.sleep(0.05)
    assert rows and rows[0]["status"] == "reject" and "closed" in rows[0]["reason"]


def test_missing_or_unknown_token_is_401_with_www_authenticate(api) -> None:
    _, url = api
    r = httpx.post(f"{url}/v1/submissions", json=document())
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["errors"][0]["field"] == "Authorization"
    r = httpx.get(f"{url}/v1/messages/{uuid.uuid4()}", headers={"Authorization": "Bearer guessed"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


def test_roles_decide_who_submits_and_who_sees(api) -> None:
    _running, url = api
    mine = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital")).json()["id"]
    assert httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("auditor")).status_code == 403
    assert httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("doctor")).status_code == 403
    assert httpx.get(f"{url}/v1/messages/{mine}", headers=auth("hospital")).status_code == 200
    assert httpx.get(f"{url}/v1/messages/{mine}", headers=auth("auditor")).status_code == 200
    hidden = httpx.get(f"{url}/v1/messages/{mine}", headers=auth("clinic"))
    assert hidden.status_code == 404  # not 403: another client's ids do not leak
    malformed = httpx.get(f"{url}/v1/messages/not-a-uuid", headers=auth("auditor"))
    assert malformed.status_code == 422 and malformed.json()["errors"][0]["field"] == "message_id"


def test_messages_of_other_protocols_can_be_followed(relais) -> None:
    from hl7.client import MLLPClient

    running = relais(listeners={"mllp": [{"name": "mllp", "port": 0}], "http": [http_listener()]})
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    with MLLPClient("127.0.0.1", running.port) as client:
        client.send_message(adt(control_id="MLLP-1"))
    row = running.store.query("SELECT message_id FROM relais_messages WHERE control_id = 'MLLP-1'")[0]
    view = httpx.get(f"{url}/v1/messages/{row['message_id']}", headers=auth("auditor")).json()
    assert view["protocol"] == "mllp" and view["status"] == "accepted"


def test_hl7_over_http_gets_the_mllp_ack_and_resends_get_it_byte_for_byte(api) -> None:
    running, url = api
    headers = {**auth("hospital"), "Content-Type": "application/hl7-v2"}
    message = adt(control_id="HTTP-1").encode()
    first = httpx.post(f"{url}/v1/hl7", content=message, headers=headers)
    assert first.status_code == 200 and first.headers["content-type"].startswith("application/hl7-v2")
    assert b"MSA|AA|HTTP-1" in first.content
    again = httpx.post(f"{url}/v1/hl7", content=message, headers=headers)
    assert again.content == first.content
    bad = httpx.post(f"{url}/v1/hl7", content=adt(version="9.9").encode(), headers=headers)
    assert bad.status_code == 200 and b"MSA|AR|" in bad.content and b"ERR||MSH^1^12|203" in bad.content
    row = running.store.query("SELECT message_id, protocol FROM relais_messages WHERE control_id = 'HTTP-1'")[0]
    assert row["protocol"] == "http-hl7"
    assert httpx.get(f"{url}/v1/messages/{row['message_id']}", headers=auth("hospital")).status_code == 200
    assert httpx.get(f"{url}/v1/messages/{row['message_id']}", headers=auth("clinic")).status_code == 404


def test_hl7_over_http_refuses_other_content_types_and_enhanced_mode_answers_ca(api) -> None:
    _, url = api
    r = httpx.post(f"{url}/v1/hl7", json={"msh": 1}, headers=auth("hospital"))
    assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json"
    headers = {**auth("hospital"), "Content-Type": "application/hl7-v2"}
    r = httpx.post(f"{url}/v1/hl7", content=adt(accept_ack="AL", app_ack="NE").encode(), headers=headers)
    assert b"MSA|CA|" in r.content
    r = httpx.post(f"{url}/v1/hl7", content=adt(accept_ack="NE", app_ack="NE").encode(), headers=headers)
    assert r.status_code == 204
    assert httpx.post(f"{url}/v1/hl7", content=adt().encode(), headers={**headers, **auth("doctor")}).status_code == 403


def test_openapi_is_published(api) -> None:
    _, url = api
    doc = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/submissions", "/v1/hl7", "/v1/messages/{message_id}"} <= set(doc["paths"])
    assert "DocumentSubmission" in doc["components"]["schemas"]


def test_oversized_hl7_is_413_and_kept_as_a_rejected_message(relais) -> None:
    running, url = start(relais, max_body_bytes=2_000)
    big = adt(control_id="BIG-1", extra_segments=tuple(f"NTE|{i}|L|{'x' * 80}" for i in range(40))).encode()
    r = httpx.post(f"{url}/v1/hl7", content=big, headers={**auth("hospital"), "Content-Type": "application/hl7-v2"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    rows = running.store.query("SELECT protocol, status, ack_code FROM relais_messages")
    assert rows == [{"protocol": "http-hl7", "status": "reject", "ack_code": "AR"}]


def test_large_documents_in_multipart_and_base64_are_stored_whole(api) -> None:
    running, url = api
    big = bytes(range(256)) * 6000  # 1.5 MB: above the inline limit, lands in the blob folder
    meta = document()
    meta["documents"][0] = {"filename": "scan.pdf", "content_type": "application/pdf", "part": "scan"}
    r = httpx.post(
        f"{url}/v1/submissions",
        headers=auth("hospital"),
        data={"metadata": json.dumps(meta)},
        files={"scan": ("scan.pdf", big, "application/pdf")},
    )
    assert r.status_code == 202, r.text
    r2 = httpx.post(f"{url}/v1/submissions", json=document(big), headers=auth("hospital"))
    assert r2.status_code == 202
    for answer in (r, r2):
        fields = running.store.events_of(uuid.UUID(answer.json()["id"]))[1].event
        assert running.store.payload(fields["documents"][0]["sha256"]) == big


def test_the_api_runs_beside_acceptor_processes(relais) -> None:
    """With MLLP in acceptor processes, the API stays in the engine's process and both
    messages are followed through it."""
    from hl7.client import MLLPClient

    running = relais(listeners={"mllp": [{"name": "mllp", "port": 0}], "http": [http_listener()]},
                     ingest={"acceptors": 1})  # fmt: skip
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    with MLLPClient("127.0.0.1", running.app.port_of("mllp")) as client:
        client.send_message(adt(control_id="ACC-1"))
    r = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))
    assert r.status_code == 202
    row = running.store.query("SELECT message_id FROM relais_messages WHERE control_id = 'ACC-1'")[0]
    assert httpx.get(f"{url}/v1/messages/{row['message_id']}", headers=auth("auditor")).json()["protocol"] == "mllp"


def test_the_status_follows_the_routers_decision(relais, tmp_path) -> None:
    """The router's decision shows in the status (no channel here: the submission is
    recorded as not routed, with the router's reason)."""
    routes = tmp_path / "routes"
    routes.mkdir()
    listeners = {"mllp": [], "http": [http_listener()]}
    running = relais(listeners=listeners, routing={"enabled": True, "routes_dir": str(routes)})
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    r = httpx.post(f"{url}/v1/submissions", json=document(), headers=auth("hospital"))
    view: dict[str, Any] = {}
    for _ in range(300):
        view = httpx.get(f"{url}{r.headers['location']}", headers=auth("hospital")).json()
        if view["status"] != "accepted":
            break
        time.sleep(0.05)
    assert view["status"] == "not_routed"
    assert view["events"][-1]["topic"] == "relais.NotRouted" and view["events"][-1]["fields"]["reason"]
