"""Group commit: batches from concurrent senders, NAK for all when the store cannot commit."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from hl7.client import MLLPClient

from engine.er7 import Er7Message
from tests.conftest import adt


def send_many(port: int, count: int) -> list[tuple[str, str]]:
    out = []
    with MLLPClient("127.0.0.1", port) as client:
        for _ in range(count):
            message = adt()
            raw = client.send_message(message)
            ack = Er7Message.parse(raw.strip(b"\x0b\x1c\r").decode())
            out.append((Er7Message.parse(message).get("MSH-10"), ack.get("MSA-1")))
    return out


# Both places a commit can run: a worker thread (default) and the event loop.
on_loop_or_thread = pytest.mark.parametrize("on_loop", [False, True], ids=["thread", "loop"])


@on_loop_or_thread
def test_concurrent_senders_are_all_acked_and_stored_once(relais, on_loop: bool) -> None:
    running = relais(ingest={"commit_on_loop": on_loop})
    with ThreadPoolExecutor(8) as pool:
        results = [r for batch in pool.map(lambda _: send_many(running.port, 40), range(8)) for r in batch]
    assert {code for _, code in results} == {"AA"}
    stored = {r["control_id"] for r in running.store.query("SELECT control_id FROM relais_messages")}
    assert stored == {cid for cid, _ in results}
    assert running.store.verify_chain().ok


@on_loop_or_thread
def test_store_that_cannot_commit_naks_and_the_listener_survives(relais, on_loop: bool) -> None:
    running = relais(
        store={"url": "sqlite:///relais.db", "blob_dir": "blobs", "lock_timeout": 0.2},
        ingest={"commit_on_loop": on_loop},
    )
    db = running.config.base_dir / "relais.db"
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        original = adt()
        enhanced = adt(accept_ack="AL")
        with MLLPClient("127.0.0.1", running.port) as client:
            nak = Er7Message.parse(client.send_message(original).strip(b"\x0b\x1c\r").decode())
            cr = Er7Message.parse(client.send_message(enhanced).strip(b"\x0b\x1c\r").decode())
        assert nak.get("MSA-1") == "AR" and nak.get("ERR-3.1") == "207"
        assert "resend" in nak.get("MSA-3")
        assert cr.get("MSA-1") == "CR"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Nothing was stored while locked; the same messages resent now are accepted.
    assert running.store.query("SELECT * FROM relais_messages") == []
    with MLLPClient("127.0.0.1", running.port) as client:
        ack = Er7Message.parse(client.send_message(original).strip(b"\x0b\x1c\r").decode())
    assert ack.get("MSA-1") == "AA"
    assert running.store.verify_chain().ok


@on_loop_or_thread
def test_duplicates_inside_one_batch_are_recognised(relais, on_loop: bool) -> None:
    running = relais(ingest={"batch_window_ms": 50, "commit_on_loop": on_loop})
    message = adt(control_id=f"SAME-{uuid.uuid4().hex[:8]}")
    barrier = threading.Barrier(4)

    def one() -> str:
        with MLLPClient("127.0.0.1", running.port) as client:
            barrier.wait()
            return Er7Message.parse(client.send_message(message).strip(b"\x0b\x1c\r").decode()).get("MSA-1")

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: one(), range(4)))
    assert codes == ["AA"] * 4
    [row] = running.store.query("SELECT message_id FROM relais_messages")
    topics = [e.topic for e in running.store.events_of(uuid.UUID(row["message_id"]))]
    assert topics == ["relais.MessageReceived"] + ["relais.DuplicateReceived"] * 3


@on_loop_or_thread
def test_message_in_flight_at_shutdown_still_gets_its_ack(relais, on_loop: bool) -> None:
    # the writer holds the batch a while
    running = relais(ingest={"batch_window_ms": 300, "commit_on_loop": on_loop})
    message = adt()
    answers: list[bytes] = []

    def sender() -> None:
        with MLLPClient("127.0.0.1", running.port) as client:
            answers.append(client.send_message(message))

    thread = threading.Thread(target=sender)
    thread.start()
    deadline = time.monotonic() + 5
    while not running.app.mllp["mllp"]._busy and time.monotonic() < deadline:
        time.sleep(0.005)
    running.stop()
    thread.join(10)
    assert answers and b"MSA|AA|" in answers[0]


def test_a_bad_follower_record_does_not_cost_messages_their_ack(relais) -> None:
    import asyncio

    from engine.ingest import Appendix, IngestUnavailable

    running = relais(ingest={"batch_window_ms": 100})  # the two land in one batch
    ingestor = running.app.ingestor
    bad = Appendix(statements=[("INSERT INTO no_such_table VALUES (?)", [(1,)])])

    async def append_bad() -> str:
        try:
            await ingestor.append(bad)
        except IngestUnavailable:
            return "refused"
        return "accepted"

    outcome = asyncio.run_coroutine_threadsafe(append_bad(), running.loop)
    with MLLPClient("127.0.0.1", running.port) as client:
        ack = Er7Message.parse(client.send_message(adt()).strip(b"\x0b\x1c\r").decode())
    assert ack.get("MSA-1") == "AA"
    assert outcome.result(10) == "refused"


def test_a_submission_carries_its_protocol_events_and_a_blob_spooled_by_the_edge(relais) -> None:
    """What DICOM and mail intakes rely on: a payload the edge spooled to the blob store is
    placed without a copy, synced before the commit that names it, and the protocol's own
    events follow MessageReceived in the same commit."""
    import asyncio

    from engine.ingest import Submission
    from event_store import DuplicateReceived, PayloadRef
    from event_store.blobs import sha256_hex

    running = relais()
    store = running.app.store
    content = b"DICM" + bytes(range(256)) * 2000  # > inline limit: lives in the blob folder
    spooled = store.blobs.spool / "incoming.part"
    spooled.write_bytes(content)
    sha, size = sha256_hex(content), len(content)
    synced = store.blobs.place(spooled, sha)
    assert not spooled.exists() and store.blobs.get(sha) == content
    ref = PayloadRef(sha, size, "application/dicom", inline=False)
    extra = DuplicateReceived("2026-11-24T00:00:00+00:00", "dicom", "127.0.0.1")  # any event will do
    submission = Submission(
        listener="dicom", protocol="dicom", peer="127.0.0.1", payload=b"", content_type="application/dicom",
        control_id="1.2.3.4", events=[extra], stored_payload=ref, blob_synced=synced,
    )  # fmt: skip
    receipt = asyncio.run_coroutine_threadsafe(running.app.ingestor.submit(submission), running.loop).result(10)
    events = store.events_of(receipt.message_id)
    assert [e.topic for e in events] == ["relais.MessageReceived", "relais.DuplicateReceived"]
    assert [e.version for e in events] == [1, 2]
    assert store.payload(sha) == content
    again = asyncio.run_coroutine_threadsafe(running.app.ingestor.submit(submission), running.loop).result(10)
    assert again.duplicate and again.message_id == receipt.message_id
