"""Acceptor processes: listeners and HL7 intake in child processes, one writer; the same
guarantees as in one process (ACK after commit, resends recognised, application ACKs)."""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import uuid
from pathlib import Path

from hl7.client import MLLPClient
from pydicom import dcmread

from engine.er7 import Er7Message
from tests.conftest import adt, wait_for
from tests.dicom_files import dcmtk, dicom_listeners, sample


def ack_of(port: int, message: str) -> Er7Message:
    with MLLPClient("127.0.0.1", port) as client:
        return Er7Message.parse(client.send_message(message).strip(b"\x0b\x1c\r").decode())


def test_acceptor_processes_ack_after_commit_and_recognise_resends(relais) -> None:
    running = relais(ingest={"acceptors": 2})
    port = running.app.port_of("mllp")
    assert running.app.mllp == {}  # nothing listens in the writer process
    messages = [adt(control_id=f"ACC-{i}") for i in range(12)]
    for message in messages:  # new connections spread over both acceptors
        assert ack_of(port, message).get("MSA-1") == "AA"
    stored = running.store.query("SELECT control_id, message_id FROM relais_messages")
    assert sorted(r["control_id"] for r in stored) == sorted(f"ACC-{i}" for i in range(12))
    assert ack_of(port, messages[0]).get("MSA-2") == "ACC-0"  # a resend: original ACK
    first = next(r for r in stored if r["control_id"] == "ACC-0")
    topics = [e.topic for e in running.store.events_of(uuid.UUID(first["message_id"]))]
    assert topics == ["relais.MessageReceived", "relais.DuplicateReceived"]
    assert ack_of(port, "not hl7").get("MSA-1") == "AR"


def test_a_killed_acceptor_is_replaced(relais) -> None:
    running = relais(ingest={"acceptors": 1})
    port = running.app.port_of("mllp")
    assert running.app.acceptors is not None
    [pid] = running.app.acceptors.pids
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "relais-accept0"  # as ps and top show it
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if ack_of(port, adt()).get("MSA-1") == "AA":
                break
        except (ConnectionError, OSError):
            pass
        assert time.monotonic() < deadline, "no acceptor came back"
        time.sleep(0.2)
    assert running.app.acceptors.pids != [pid]


def test_application_ack_comes_from_the_acceptor_after_routing(relais, tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "drop.toml").write_text(
        f'[[destination]]\nname = "drop"\ntype = "file"\n[destination.settings]\nfolder = "{tmp_path / "out"}"\n'
    )
    running = relais(ingest={"acceptors": 1}, routing={"enabled": True, "routes_dir": str(routes)})
    with socket.create_connection(("127.0.0.1", running.app.port_of("mllp")), timeout=10) as sock:
        sock.sendall(b"\x0b" + adt(control_id="ACC-APP", accept_ack="AL", app_ack="AL").encode() + b"\x1c\r")
        buf = b""
        while buf.count(b"\x1c") < 2:
            buf += sock.recv(65536)
    acks = [Er7Message.parse(f.strip(b"\x0b\r").decode()) for f in buf.split(b"\x1c") if f.strip(b"\x0b\r")]
    assert [a.get("MSA-1") for a in acks] == ["CA", "AA"]


def test_dicom_listeners_run_in_the_acceptors(relais, tmp_path: Path) -> None:
    """Each acceptor receives, places and syncs its blobs; the writer only commits. A small
    instance goes into the database, a large one into the blob folder, and a refused
    association is recorded, as in one process."""
    running = relais(listeners=dicom_listeners(), ingest={"acceptors": 2})
    assert running.app.dicom == {}  # nothing listens in the writer process
    port = running.app.port_of("dicom")
    small = sample("CT_small.dcm", tmp_path / "in")
    ds = dcmread(sample("CT_small.dcm", tmp_path / "big"))
    ds.add_new(0x00091010, "LO", "RELAIS TEST")  # private creator
    ds.add_new(0x00091011, "OB", b"\x01" * 300_000)  # over the 256 KB kept in the database
    large = tmp_path / "in" / "large.dcm"
    ds.save_as(large, enforce_file_format=True)
    for _ in range(3):  # new associations spread over both acceptors
        done = dcmtk("storescu", "-aet", "MODALITY", "-aec", "RELAIS", "127.0.0.1", port, small, large)
        assert done.returncode == 0, done.stderr
    rows = running.store.query(
        "SELECT message_id, status, payload_sha256, payload_inline FROM relais_messages WHERE status = 'accepted'"
    )
    assert len(rows) == 2  # the second and third sends were resends
    assert sorted(bool(r["payload_inline"]) for r in rows) == [False, True]
    for row in rows:
        events = running.store.events_of(uuid.UUID(row["message_id"]))
        topics = [e.topic for e in events]
        assert topics == ["relais.MessageReceived", "relais.InstanceReceived", *["relais.DuplicateReceived"] * 2]
        stored = running.store.payload(row["payload_sha256"])
        original = large if len(stored) > 256 * 1024 else small
        assert dcmread(io.BytesIO(stored)).PixelData == dcmread(original).PixelData
    assert dcmtk("echoscu", "-aec", "WRONG", "127.0.0.1", port).returncode != 0
    assert wait_for(
        lambda: (
            running.store.query("SELECT ack_code FROM relais_messages WHERE status = 'reject'")
            == [{"ack_code": "A-ASSOCIATE-RJ"}]
        ),
        "the refused association recorded",
    )


def test_a_killed_acceptors_unacknowledged_files_go_when_it_is_replaced(relais, tmp_path: Path) -> None:
    """A DICOM acceptor keeps spool files ready (and may be killed mid-write): once it is
    dead and replaced, what it left is removed, not kept until Relais starts again."""
    running = relais(listeners=dicom_listeners(), ingest={"acceptors": 1})
    assert running.app.acceptors is not None
    [pid] = running.app.acceptors.pids
    small = sample("CT_small.dcm", tmp_path / "in")
    done = dcmtk("storescu", "-aet", "MODALITY", "-aec", "RELAIS", "127.0.0.1", running.app.port_of("dicom"), small)
    assert done.returncode == 0, done.stderr
    blobs = running.store.blobs.root
    half_written = blobs / "ab" / f".{'ab' * 32}.{pid}.tmp"
    half_written.write_bytes(b"\x00" * 1000)  # what a kill in the middle of a blob write leaves
    assert wait_for(lambda: list(blobs.glob(f"spool/*.{pid}.*")), "the acceptor's spool files made ahead")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: running.app.acceptors.pids != [pid], "a new acceptor")
    assert wait_for(
        lambda: not list(blobs.glob(f"spool/*.{pid}.*")) and not half_written.exists(),
        "the dead acceptor's files removed",
    )
    port = running.app.port_of("dicom")
    resend = ("storescu", "-aet", "MODALITY", "-aec", "RELAIS", "127.0.0.1", port, small)
    assert wait_for(lambda: dcmtk(*resend).returncode == 0, "the new acceptor takes the instance again")
    [row] = running.store.query("SELECT payload_sha256 FROM relais_messages WHERE status = 'accepted'")
    assert (
        dcmread(io.BytesIO(running.store.payload(row["payload_sha256"]))).SOPInstanceUID
        == dcmread(small).SOPInstanceUID
    )
