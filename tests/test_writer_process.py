"""The writer in its own process (`[ingest] writer_process = true`): what is ACKed is stored,
routed and delivered once and in order per key, across engine restarts and the writer
process's death; DICOM instances and REST submissions go through it as well."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from hl7.client import MLLPClient
from pydicom import dcmread

from tests.conftest import RunningRelais, adt, wait_for
from tests.dicom_files import dicom_listeners, sample
from tests.test_dicom_intake import scu
from tests.test_rest_api import CR_PDF, auth, document, http_listener
from tests.test_router_process import once_in_order_across_a_restart, send_burst
from tests.test_routing import channel_file, received_by


def hub(relais, tmp_path: Path, **overrides) -> RunningRelais:
    """The hub on tmp_path/hub (the same store each time), committing in a writer process."""
    home = tmp_path / "hub"
    running = relais(
        store={"url": f"sqlite:///{home / 'relais.db'}", "blob_dir": str(home / "blobs")},
        routing={"enabled": True, "routes_dir": str(tmp_path / "routes")},
        ingest={"writer_process": True},
        **overrides,
    )
    writer = running.app.ingestor
    assert getattr(writer, "pid", None) not in (None, os.getpid())  # really another process
    return running


def ipp_of(control_id: str) -> str:
    return f"WP{int(control_id.rsplit('-', 1)[1]) % 7:03d}"


def test_messages_are_acked_routed_and_delivered_once_in_order_across_a_restart(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    once_in_order_across_a_restart(hub(relais, tmp_path), lambda: hub(relais, tmp_path), partner, "WPR", ipp_of)


def test_a_killed_writer_process_is_restarted_and_nothing_acked_is_lost(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    running = hub(relais, tmp_path)
    writer = running.app.ingestor
    pid = writer.pid  # type: ignore[union-attr]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "relais-writer"  # as ps and top show it
    answers: dict[str, str] = {}

    def send_all(ids: list[str]) -> None:
        with MLLPClient("127.0.0.1", running.port) as client:
            for control_id in ids:
                ack = client.send_message(adt("A08", control_id=control_id, ipp=ipp_of(control_id), ins=None))
                answers[control_id] = ack.decode().split("MSA|", 1)[1][:2]
                time.sleep(0.002)

    everything = [f"WPK-{n}" for n in range(300)]
    senders = [threading.Thread(target=send_all, args=(everything[i::3],)) for i in range(3)]
    for t in senders:
        t.start()
    wait_for(lambda: len(answers) >= 30, what="messages under way")
    os.kill(pid, signal.SIGKILL)  # in the middle of the burst
    for t in senders:
        t.join(60)
    wait_for(lambda: writer.restarts >= 1, what="the writer process to be restarted")  # type: ignore[union-attr]
    refused = [c for c in everything if answers[c] != "AA"]
    acked = [c for c in everything if answers[c] == "AA"]
    assert acked and all(answers[c] in ("AE", "AR") for c in refused)  # never an ACK for what is not stored
    # What was not stored is sent again, as a sender does after a negative ACK.
    send_burst(running.port, refused, ipp_of)
    wait_for(lambda: len(received_by(partner)) >= len(everything), timeout=60, what="every delivery")
    received = [
        r.event["metadata"]["control_id"] for r in running.store.read_log() if r.topic == "relais.MessageReceived"
    ]
    assert sorted(set(received)) == sorted(everything)  # every message ACKed is in the log
    got = [m.get("MSH-10") for m in received_by(partner)]
    assert sorted(got) == sorted(everything)  # delivered once each
    assert running.store.verify_chain().ok


def test_a_hung_writer_process_is_killed_and_what_waited_for_it_is_refused_not_lost(relais, tmp_path: Path) -> None:
    partner = relais()
    channel_file(tmp_path / "routes", partner.port)
    running = hub(relais, tmp_path)
    writer = running.app.ingestor
    writer.child.hang_timeout = 2.0  # type: ignore[union-attr]  # 60 s by default
    pid = writer.pid  # type: ignore[union-attr]
    message = adt("A01", control_id="WHUNG-1", ins=None)
    os.kill(pid, signal.SIGSTOP)  # alive, and silent: it commits nothing
    try:
        with MLLPClient("127.0.0.1", running.port) as client:
            client.socket.settimeout(20)  # a hang not detected fails here, not forever
            nak = client.send_message(message).decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert "MSA|AA|" not in nak and ("MSA|AE|" in nak or "MSA|AR|" in nak)  # not stored: said so
    wait_for(lambda: writer.restarts >= 1, timeout=20, what="the hung writer process to be replaced")  # type: ignore[union-attr]
    assert writer.pid != pid  # type: ignore[union-attr]
    with MLLPClient("127.0.0.1", running.port) as client:  # resent, as a sender does after a NAK
        assert "MSA|AA|" in client.send_message(message).decode()
    wait_for(lambda: [m.get("MSH-10") for m in received_by(partner)] == ["WHUNG-1"], what="the delivery")
    assert running.store.verify_chain().ok


def test_dicom_instances_and_rest_documents_are_committed_by_the_writer_process(relais, tmp_path: Path) -> None:
    running = hub(
        relais,
        tmp_path,
        listeners={**dicom_listeners(), "http": [http_listener()]},
    )
    path = sample("CT_small.dcm", tmp_path)
    assoc = scu(running.app.port_of("dicom"))
    try:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000  # only once committed
    finally:
        assoc.release()
    received = [e for e in running.store.read_log() if e.topic == "relais.InstanceReceived"]
    assert len(received) == 1
    stored = dcmread(io.BytesIO(running.store.payload(received[0].event["sha256"])))
    assert stored.PixelData == dcmread(path).PixelData
    # A document (its content stored with it) and the same Idempotency-Key with another body.
    url = f"http://127.0.0.1:{running.app.port_of('http')}"
    headers = {**auth("hospital"), "Idempotency-Key": "wp-1"}
    first = httpx.post(f"{url}/v1/submissions", json=document(), headers=headers)
    assert first.status_code == 202
    assert CR_PDF in running.store.payloads(_hashes(running)).values()
    other = httpx.post(f"{url}/v1/submissions", json=document(b"another report"), headers=headers)
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"


def _hashes(running: RunningRelais) -> list[str]:
    return [r["sha256"] for r in running.store.query("SELECT sha256 FROM relais_payloads")]
