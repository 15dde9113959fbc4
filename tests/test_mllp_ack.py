"""ACKs over MLLP as a hospital interface sees them, with python-hl7's MLLP client."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import hl7
from hl7.client import MLLPClient

from engine.er7 import Er7Message
from tests.conftest import adt


def send(port: int, message: str, encoding: str = "utf-8") -> Er7Message:
    with MLLPClient("127.0.0.1", port, encoding=encoding) as client:
        raw = client.send_message(message)
    return Er7Message.parse(raw.strip(b"\x0b\x1c\r").decode(encoding))


def stored_rows(running, control_id: str) -> list[dict]:
    return running.store.query("SELECT * FROM relais_messages WHERE control_id = ?", [control_id])


def test_aa_is_sent_only_once_the_message_is_in_the_store(relais) -> None:
    running = relais()
    message = adt("A01")
    ack = send(running.port, message)
    assert ack.get("MSA-1") == "AA"
    control_id = Er7Message.parse(message).get("MSH-10")
    assert ack.get("MSA-2") == control_id
    [row] = stored_rows(running, control_id)
    # The bytes kept are the bytes sent, and the event names them by hash.
    assert running.store.payload(row["payload_sha256"]) == message.encode()
    [event] = running.store.events_of(uuid.UUID(row["message_id"]))
    meta = event.event["metadata"]
    assert event.topic == "relais.MessageReceived"
    assert meta["message_type"] == "ADT" and meta["trigger_event"] == "A01"
    assert meta["sending_application"] == "SIH_CHU" and meta["identity_reliability"] == "VALI"
    ins = [i for i in meta["patient_identifiers"] if i["type"] == "INS"]
    assert ins == [
        {"id": "260058815400233", "type": "INS", "authority": "ASIP-SANTE-INS-NIR",
         "authority_oid": "1.2.250.1.213.1.4.8"}
    ]  # fmt: skip
    assert meta["visit_number"] == "V20261123001"


def test_ack_fields_follow_hl7_and_pam_france(relais) -> None:
    running = relais()
    message = adt("A28", sender=("SIH_CHU", "CHU_EXEMPLE"))
    ack = send(running.port, message)
    assert [ack.get(p) for p in ("MSH-3", "MSH-4", "MSH-5", "MSH-6")] == [
        "RELAIS", "GRADES", "SIH_CHU", "CHU_EXEMPLE",
    ]  # fmt: skip
    assert ack.raw_field("MSH", 9) == "ACK^A28^ACK"
    assert ack.get("MSH-10") and ack.get("MSH-10") != Er7Message.parse(message).get("MSH-10")
    assert ack.raw_field("MSH", 12) == "2.5^FRA^2.11"
    assert ack.get("MSH-18") == "UNICODE UTF-8"
    assert not ack.has_segment("ERR")


def test_each_pam_trigger_is_accepted(relais) -> None:
    running = relais()
    for trigger in ("A01", "A02", "A03", "A04", "A05", "A08", "A11", "A13", "A28", "A31", "A40",
                    "A47", "Z99"):  # fmt: skip
        extra = ("MRG|OLD123^^^CHU_EXEMPLE&1.2.250.1.71.4.2.2&ISO^PI",) if trigger in ("A40", "A47") else ()
        if trigger == "Z99":
            extra = ("ZBE|MVT42^CHU_EXEMPLE|20261123101500||UPDATE|N|A01|CARDIO||HMS",)
        ack = send(running.port, adt(trigger, extra_segments=extra))
        assert ack.get("MSA-1") == "AA", trigger
    rows = running.store.query("SELECT trigger_event FROM relais_messages")
    assert len(rows) == 13


def test_required_field_rule_answers_ae_with_err_and_keeps_the_message(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "required_fields": ["PV1-19", "PID-3"]}]})
    message = adt("A01").replace("V20261123001", "")
    ack = send(running.port, message)
    assert ack.get("MSA-1") == "AE"
    assert ack.get("ERR-2.1") == "PV1" and ack.get("ERR-2.3") == "19"
    assert ack.get("ERR-3.1") == "101" and ack.get("ERR-3.3") == "HL70357"
    assert ack.get("ERR-4") == "E"
    [row] = stored_rows(running, Er7Message.parse(message).get("MSH-10"))
    events = running.store.events_of(uuid.UUID(row["message_id"]))
    assert [e.topic for e in events] == ["relais.MessageReceived", "relais.MessageRejected"]
    assert events[1].event["code"] == "AE" and events[1].event["location"] == "PV1-19"
    assert running.store.payload(row["payload_sha256"]) == message.encode()


def test_forbidden_pam_field_answers_ae(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "forbidden_fields": ["PID-2", "PID-4"]}]})
    message = adt("A01").replace("PID|1||", "PID|1|OLDID|")
    ack = send(running.port, message)
    assert ack.get("MSA-1") == "AE" and ack.get("ERR-2.1") == "PID" and ack.get("ERR-2.3") == "2"


def test_not_hl7_answers_ar_and_is_recorded(relais) -> None:
    running = relais()
    ack = send(running.port, "this is not HL7\r")
    assert ack.get("MSA-1") == "AR" and ack.get("ERR-3.1") == "100"
    [row] = running.store.query("SELECT * FROM relais_messages WHERE status = 'reject'")
    assert running.store.payload(row["payload_sha256"]) == b"this is not HL7\r"


def test_unsupported_version_answers_ar_203(relais) -> None:
    running = relais()
    ack = send(running.port, adt(version="3.0"))
    assert ack.get("MSA-1") == "AR" and ack.get("ERR-3.1") == "203" and ack.get("ERR-2.3") == "12"


def test_sender_outside_allow_list_answers_ar(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "allowed_senders": ["SIH_CHU|CHU_EXEMPLE"]}]})
    assert send(running.port, adt()).get("MSA-1") == "AA"
    ack = send(running.port, adt(sender=("INTRUS", "AILLEURS")))
    assert ack.get("MSA-1") == "AR" and ack.get("ERR-2.1") == "MSH"
    rejected = running.store.query("SELECT sender FROM relais_messages WHERE status = 'reject'")
    assert rejected == [{"sender": "INTRUS|AILLEURS"}]


def test_enhanced_mode_sends_commit_acks_per_msh15(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "required_fields": ["PV1-19"]}]})
    bad = {"extra_segments": ()}
    ack = send(running.port, adt(accept_ack="AL", app_ack="NE"))
    assert ack.get("MSA-1") == "CA"
    ack = send(running.port, adt(accept_ack="SU", app_ack="NE"))
    assert ack.get("MSA-1") == "CA"
    ack = send(running.port, adt(accept_ack="AL", **bad).replace("V20261123001", ""))
    assert ack.get("MSA-1") == "CE" and ack.get("ERR-3.1") == "101"
    ack = send(running.port, adt(accept_ack="AL", version="9.9"))
    assert ack.get("MSA-1") == "CR"
    # ER: nothing on success, an answer on error; NE: never an answer.
    with MLLPClient("127.0.0.1", running.port) as client:
        client.socket.settimeout(1.0)
        for accept, valid, answered in (("ER", True, False), ("NE", False, False), ("ER", False, True),
                                         ("SU", False, False)):  # fmt: skip
            message = adt(accept_ack=accept)
            if not valid:
                message = message.replace("V20261123001", "")
            client.socket.sendall(b"\x0b" + message.encode() + b"\x1c\r")
            try:
                got = client.socket.recv(65536)
            except TimeoutError:
                got = b""
            assert bool(got) is answered, (accept, valid)
            assert stored_rows(running, Er7Message.parse(message).get("MSH-10"))


def test_resend_gets_the_original_ack_and_is_recorded_as_duplicate(relais) -> None:
    running = relais()
    message = adt("A01")
    first = send(running.port, message)
    second = send(running.port, message)
    assert second.segments == first.segments  # byte-for-byte the same answer
    control_id = Er7Message.parse(message).get("MSH-10")
    [row] = stored_rows(running, control_id)
    events = running.store.events_of(uuid.UUID(row["message_id"]))
    assert [e.topic for e in events] == ["relais.MessageReceived", "relais.DuplicateReceived"]


def test_resend_of_a_rejected_message_gets_the_same_nak(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "required_fields": ["PV1-19"]}]})
    message = adt().replace("V20261123001", "")
    assert send(running.port, message).segments == send(running.port, message).segments
    assert len(running.store.query("SELECT * FROM relais_messages")) == 1


def test_same_control_id_with_other_content_is_a_new_flagged_message(relais) -> None:
    running = relais()
    first = adt("A01", control_id="CTL-REUSED")
    second = adt("A03", control_id="CTL-REUSED")
    assert send(running.port, first).get("MSA-1") == "AA"
    assert send(running.port, second).get("MSA-1") == "AA"
    rows = stored_rows(running, "CTL-REUSED")
    assert len(rows) == 2
    flags = [running.store.events_of(uuid.UUID(r["message_id"]))[0].event["flags"] for r in rows]
    assert sorted(flags) == [[], ["control_id_reused"]]


def test_iso_8859_15_message_is_decoded_and_answered_in_its_charset(relais) -> None:
    running = relais()
    message = adt(charset="8859/15", family="LEFÈVRE-DUPRÉ")
    raw = message.encode("iso-8859-15")
    with MLLPClient("127.0.0.1", running.port, encoding="iso-8859-15") as client:
        answer = client.send_message(raw)
    ack = Er7Message.parse(answer.strip(b"\x0b\x1c\r").decode("iso-8859-15"))
    assert ack.get("MSA-1") == "AA" and ack.get("MSH-18") == "8859/15"
    [row] = stored_rows(running, Er7Message.parse(message).get("MSH-10"))
    assert running.store.payload(row["payload_sha256"]) == raw  # raw bytes, not re-encoded
    meta = running.store.events_of(uuid.UUID(row["message_id"]))[0].event["metadata"]
    assert meta["decoded_as"] == "iso-8859-15"


def test_an_ack_is_never_acknowledged(relais) -> None:
    running = relais()
    ack_message = "MSH|^~\\&|PARTNER|FAC|RELAIS|GRADES|20261123||ACK^A01^ACK|A1|P|2.5\rMSA|AA|X1\r"
    with MLLPClient("127.0.0.1", running.port) as client:
        client.socket.settimeout(1.0)
        client.socket.sendall(b"\x0b" + ack_message.encode() + b"\x1c\r")
        try:
            got = client.socket.recv(100)
        except TimeoutError:
            got = b""
    assert got == b""
    assert stored_rows(running, "A1")


def test_mllp_send_command_line_client(relais, tmp_path: Path) -> None:
    running = relais()
    messages = [adt("A01"), adt("A03")]
    path = tmp_path / "batch.hl7"
    # mllp_send reads messages separated by the MLLP end block from a file.
    path.write_bytes(b"".join(b"\x0b" + m.encode() + b"\x1c\r" for m in messages))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mllp_send"), "--port", str(running.port), "--file", str(path),
         "--loose", "127.0.0.1"],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    acks = [hl7.parse(a.strip()) for a in result.stdout.decode().split("\x1c") if "MSA" in a]
    assert [str(a.segment("MSA")[1]) for a in acks] == ["AA", "AA"]
    assert len(running.store.query("SELECT * FROM relais_messages")) == 2


def test_strict_listener_validates_with_hl7apy(relais) -> None:
    running = relais(listeners={"mllp": [{"port": 0, "validation": "strict"}]})
    assert send(running.port, adt("A01")).get("MSA-1") == "AA"
    without_pid = "\r".join(s for s in adt("A01").split("\r") if not s.startswith("PID"))
    ack = send(running.port, without_pid)
    assert ack.get("MSA-1") == "AE" and ack.get("ERR-3.1") == "101" and ack.get("ERR-2.1") == "PID"
    ack = send(running.port, adt("A01").replace("19850615", "NOTADATE"))
    assert ack.get("MSA-1") == "AE" and ack.get("ERR-3.1") == "102"
    # The lenient default keeps what real senders send.
    lenient = relais()
    assert send(lenient.port, adt("A01").replace("19850615", "NOTADATE")).get("MSA-1") == "AA"


def test_every_sample_message_is_acked_and_kept_byte_for_byte(relais) -> None:
    running = relais()
    samples = sorted((Path(__file__).parent / "messages").glob("*.er7"))
    assert len(samples) >= 10
    for sample in samples:
        raw = sample.read_bytes()
        with MLLPClient("127.0.0.1", running.port) as client:
            answer = client.send_message(raw)
        ack = Er7Message.parse(answer.strip(b"\x0b\x1c\r").decode("latin-1"))
        assert ack.get("MSA-1") in ("AA", "CA"), sample.name
        assert ack.get("MSA-2") == Er7Message.parse(raw.decode("latin-1")).get("MSH-10")
    rows = running.store.query("SELECT payload_sha256 FROM relais_messages")
    stored = {running.store.payload(r["payload_sha256"]) for r in rows}
    assert stored == {s.read_bytes() for s in samples}
