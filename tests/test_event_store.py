"""The event store contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from event_store import Batch, DuplicateReceived, EventStore, MessageIndexRow, MessageReceived
from event_store.integrity import check_payloads


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = EventStore.open(url, tmp_path / "blobs", inline_limit=1000)
    yield s
    s.close()


def received(payload_ref, **meta) -> MessageReceived:
    return MessageReceived("2026-11-23T10:00:00+00:00", "mllp", "mllp", "127.0.0.1:1", payload_ref, meta)


def one_message(store: EventStore, payload: bytes, control_id: str = "C1") -> uuid.UUID:
    batch = Batch()
    ref = batch.add_payload(payload, "application/hl7-v2", store.inline_limit)
    mid = uuid.uuid4()
    batch.events.append((mid, 1, received(ref, control_id=control_id)))
    batch.index.append(
        MessageIndexRow(str(mid), "2026-11-23T10:00:00+00:00", "mllp", "mllp", "127.0.0.1:1", "A|B",
                        control_id, "ADT", "A01", ref.sha256, ref.inline, "accepted", "AA")
    )  # fmt: skip
    store.commit(batch)
    return mid


def test_small_payload_commits_inline_and_large_one_goes_to_blob_folder(store: EventStore) -> None:
    small, large = b"MSH|small", b"MSH|" + b"x" * 5000
    one_message(store, small, "S")
    mid = one_message(store, large, "L")
    [event] = store.events_of(mid)
    sha = event.event["payload"]["sha256"]
    assert event.event["payload"]["inline"] is False and store.blobs.exists(sha)
    assert store.payload(sha) == large
    rows = store.query("SELECT payload_sha256, payload_inline FROM relais_messages ORDER BY control_id")
    assert [r["payload_inline"] for r in rows] == [0, 1]  # L, S
    assert check_payloads(store).missing == []


def test_payloads_reads_inline_and_blob_payloads_at_once(store: EventStore) -> None:
    small, large = b"MSH|small", b"MSH|" + b"y" * 5000
    for i, data in enumerate((small, large)):
        one_message(store, data, str(i))
    hashes = [r["payload_sha256"] for r in store.query("SELECT payload_sha256 FROM relais_messages")]
    assert sorted(store.payloads([*hashes, *hashes]).values()) == sorted([small, large])


def test_events_chain_and_verify_detects_tampering(store: EventStore) -> None:
    first = one_message(store, b"MSH|one", "1")
    one_message(store, b"MSH|two", "2")
    batch = Batch()
    batch.events.append((first, 2, DuplicateReceived("2026-11-23T10:01:00+00:00", "mllp", "127.0.0.1:2")))
    store.commit(batch)
    report = store.verify_chain()
    assert report.ok and report.events == 3
    events = store.events_of(first)
    assert events[1].stream_prev == events[0].hash
    # Someone edits the first event in the database: the chain no longer verifies.
    table = "stored_events"
    if store.dialect == "sqlite":
        import sqlite3

        path = store.recorder.datastore.pool.db_name
        with sqlite3.connect(path) as conn:
            conn.execute(
                f"UPDATE {table} SET state = CAST(replace(state, 'mllp', 'MLLP') AS BLOB) WHERE originator_id = ?",
                (first.hex,),
            )
    else:
        import psycopg

        with psycopg.connect("host=127.0.0.1 dbname=test user=postgres", autocommit=True) as conn:
            conn.execute(
                f"UPDATE {table} SET state = convert_to(replace(convert_from(state, 'UTF8'), "
                "'mllp', 'MLLP'), 'UTF8') WHERE originator_id = %s AND originator_version = 1",
                (first,),
            )
    assert not store.verify_chain().ok


def test_a_failed_commit_leaves_nothing_and_the_chain_intact(store: EventStore) -> None:
    mid = one_message(store, b"MSH|one", "1")
    head = store.verify_chain().head
    batch = Batch()
    ref = batch.add_payload(b"MSH|two", "application/hl7-v2", store.inline_limit)
    batch.events.append((uuid.uuid4(), 1, received(ref)))
    batch.events.append((mid, 1, received(ref)))  # version 1 of an existing stream: conflict
    with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
        store.commit(batch)
    assert store.verify_chain().head == head
    assert len(store.query("SELECT * FROM relais_payloads")) == 1
    one_message(store, b"MSH|three", "3")
    assert store.verify_chain().ok


def test_a_large_batch_keeps_its_order_its_rows_and_its_chain(store: EventStore) -> None:
    # More rows than one multi-row INSERT takes, and an upsert of one key twice in a batch.
    batch = Batch()
    ids = []
    for i in range(450):
        ref = batch.add_payload(f"MSH|{i}".encode(), "application/hl7-v2", store.inline_limit)
        mid = uuid.uuid4()
        ids.append(mid)
        batch.events.append((mid, 1, received(ref, control_id=str(i))))
        batch.index.append(
            MessageIndexRow(str(mid), "2026-11-23T10:00:00+00:00", "mllp", "mllp", "127.0.0.1:1", "A|B",
                            str(i), "ADT", "A01", ref.sha256, ref.inline, "accepted", "AA")
        )  # fmt: skip
    upsert = "INSERT INTO relais_tracking (name, position) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET position = excluded.position"  # noqa: E501
    batch.statements.append((upsert, [("t", 1), ("t", 2)]))
    positions = store.commit(batch)
    log = list(store.read_log())
    assert [r.originator_id for r in log] == ids
    assert [r.event["metadata"]["control_id"] for r in log] == [str(i) for i in range(450)]
    assert positions == [r.position for r in log]
    assert store.verify_chain().ok
    assert store.query("SELECT count(*) AS n FROM relais_payloads")[0]["n"] == 450
    assert store.query("SELECT count(*) AS n FROM relais_messages")[0]["n"] == 450
    assert store.query("SELECT position FROM relais_tracking WHERE name = 't'")[0]["position"] == 2


def test_an_event_encoded_elsewhere_is_stored_as_the_event_itself(store: EventStore) -> None:
    # The router process sends its events encoded; the log must not tell them apart.
    from event_store import EncodedEvent
    from event_store.events import MessageRouted, PlannedDelivery
    from event_store.store import _encode

    ref = Batch().add_payload(b"MSH|x", "application/hl7-v2", store.inline_limit)
    routed = MessageRouted("2026-11-23T10:00:01+00:00", ["c"], [PlannedDelivery("d1", "c", "p", "k", ref)], 1)
    assert _encode(EncodedEvent.of(routed), "a" * 64, "b" * 64) == _encode(routed, "a" * 64, "b" * 64)
    mid, other = one_message(store, b"MSH|x"), one_message(store, b"MSH|y", control_id="C2")
    store.commit(Batch(events=[(mid, 2, routed), (other, 2, EncodedEvent.of(routed))]))
    first, second = (store.events_of(m)[1] for m in (mid, other))
    assert (second.topic, second.event) == (first.topic, first.event) == ("relais.MessageRouted", first.event)
    assert store.verify_chain().ok


def test_store_reopens_with_its_chain_head(store: EventStore, tmp_path: Path) -> None:
    one_message(store, b"MSH|one", "1")
    url = store.recorder.datastore.pool.db_name if store.dialect == "sqlite" else None
    head = store.verify_chain().head
    store.close()
    reopened = EventStore.open(
        f"sqlite:///{url}" if url else "postgresql://postgres@127.0.0.1:5432/test", tmp_path / "blobs", 1000
    )
    try:
        one_message(reopened, b"MSH|two", "2")
        report = reopened.verify_chain()
        assert report.ok and report.events == 2
        assert list(reopened.read_log())[1].log_prev == head
    finally:
        reopened.close()


def test_orphan_blob_is_reported_but_harmless(store: EventStore) -> None:
    store.blobs.put("ab" * 32, b"bytes without an event")
    report = check_payloads(store)
    assert report.orphans == ["ab" * 32] and report.missing == []


def test_event_without_its_blob_is_reported_missing(store: EventStore) -> None:
    mid = one_message(store, b"MSH|" + b"z" * 3000, "Z")
    sha = store.events_of(mid)[0].event["payload"]["sha256"]
    store.blobs.path_of(sha).unlink()
    assert check_payloads(store).missing == [sha]


def test_half_written_blob_of_a_dead_writer_is_reported_then_removed(tmp_path: Path) -> None:
    from event_store import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    sha = "cd" * 32
    leftover = blobs.path_of(sha).with_name(f".{sha}.999999999.tmp")  # no such process
    leftover.write_bytes(b"half")
    mine = blobs.path_of(sha).with_name(f".{sha}.{os.getpid()}.tmp")  # a live writer's
    mine.write_bytes(b"in progress")
    assert blobs.incomplete_writes() == [leftover]
    assert blobs.remove_incomplete_writes() == 1
    assert not leftover.exists() and mine.exists()
    assert list(blobs.hashes()) == []


def test_blobs_stored_by_an_earlier_layout_are_still_found(tmp_path: Path) -> None:
    from event_store import BlobStore
    from event_store.blobs import sha256_hex

    blobs = BlobStore(tmp_path / "blobs")
    data = b"an instance stored before the blob folders became one level"
    sha = sha256_hex(data)
    earlier = tmp_path / "blobs" / sha[:2] / sha[2:4] / sha  # two levels, as stores made before 2026-11-24
    earlier.parent.mkdir()
    earlier.write_bytes(data)
    assert blobs.exists(sha) and blobs.get(sha) == data
    assert list(blobs.hashes()) == [sha]
    blobs.put(sha256_hex(b"new"), b"new")
    assert sorted(blobs.hashes()) == sorted([sha, sha256_hex(b"new")])
    assert blobs.path_of(sha256_hex(b"new")).parent == tmp_path / "blobs" / sha256_hex(b"new")[:2]


def test_placed_blob_keeps_a_whole_stored_copy_and_replaces_a_torn_one(tmp_path: Path) -> None:
    from event_store import BlobStore
    from event_store.blobs import sha256_hex

    blobs = BlobStore(tmp_path / "blobs")
    data = b"an instance resent with the same bytes" * 100
    sha = sha256_hex(data)
    blobs.put(sha, data)
    stored = blobs.path_of(sha)
    inode = stored.stat().st_ino
    resent = blobs.spool / f"resent.{os.getpid()}.dcm"
    resent.write_bytes(data)
    blobs.place(resent, sha).result()
    # the committed copy is never swapped for an unsynced one
    assert stored.stat().st_ino == inode and not resent.exists()

    stored.write_bytes(data[:100])  # what a crash can leave of a placement never synced
    again = blobs.spool / f"again.{os.getpid()}.dcm"
    again.write_bytes(data)
    blobs.place(again, sha).result()
    assert blobs.get(sha) == data
    stored.write_bytes(b"")
    blobs.put(sha, data)
    assert blobs.get(sha) == data


# -- statements of many rows ------------------------------------------------------------


def _two_tables(conn) -> None:
    conn.execute(
        "CREATE TABLE outbox (delivery_id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL, "
        "error TEXT NOT NULL)"
    )
    conn.execute("CREATE TABLE ids (value TEXT NOT NULL, rri TEXT NOT NULL)")
    conn.executemany("INSERT INTO outbox VALUES (?, 'pending', 0, '')", [(f"d{i}",) for i in range(60)])
    conn.executemany("INSERT INTO ids VALUES (?, ?)", [("v1", "A"), ("v2", "B"), ("v3", "C")])


@pytest.mark.parametrize(
    ("sql", "rows", "statements"),
    [
        # Outcomes of distinct deliveries: one statement for all of them.
        (
            "UPDATE outbox SET state = ?, attempts = ?, error = ? WHERE delivery_id = ?",
            [("delivered" if i % 3 else "dead", i % 5, f"e{i}, with a comma", f"d{i}") for i in range(50)],
            1,
        ),
        # Constants among the assignments (an operator's redeliver).
        (
            "UPDATE outbox SET state = 'pending', attempts = 0, error = '' WHERE delivery_id = ?",
            [(f"d{i}",) for i in range(0, 60, 7)],
            1,
        ),
        # The same delivery twice: in order, the last one wins, as one statement per row would.
        (
            "UPDATE outbox SET state = ?, attempts = ? WHERE delivery_id = ?",
            [("failed", 1, "d3"), ("delivered", 2, "d3"), ("dead", 1, "d4")],
            3,
        ),
        # Not by the primary key: identifiers moved A -> B, then B -> C, one after the other.
        ("UPDATE ids SET rri = ? WHERE rri = ?", [("B", "A"), ("C", "B")], 2),
    ],
)
def test_a_statement_of_many_rows_writes_what_one_statement_per_row_would(sql, rows, statements) -> None:
    import sqlite3

    from event_store.recorders import _insert_rows

    expected, actual = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    for conn in (expected, actual):
        _two_tables(conn)
    for row in rows:
        expected.execute(sql, row)
    seen: list[str] = []
    actual.set_trace_callback(lambda s: seen.append(s) if s.lstrip().upper().startswith("UPDATE") else None)
    _insert_rows(actual.cursor(), sql, rows)
    for table in ("outbox", "ids"):
        query = f"SELECT * FROM {table} ORDER BY rowid"
        assert actual.execute(query).fetchall() == expected.execute(query).fetchall()
    assert len(seen) == statements


# -- the SQLite write-ahead log ------------------------------------------------------------


def _wal_restarts(db: Path) -> int:
    """The WAL header's checkpoint sequence number: how often the log has started over."""
    with open(f"{db}-wal", "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def test_a_store_that_never_rests_still_has_its_write_ahead_log_start_over(tmp_path: Path) -> None:
    # Commits one after another while another connection keeps reading (the router process
    # does): checkpoints must let the log start over from its beginning, or it grows with
    # every commit for as long as the load lasts (a gigabyte in 18 s of the e2e bench).
    import threading

    db = tmp_path / "store.db"
    store = EventStore.open(f"sqlite:///{db}", tmp_path / "blobs", checkpoint_interval=0.05)
    reader = EventStore.open(f"sqlite:///{db}", tmp_path / "blobs", checkpoints=False)
    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set():
            reader.query("SELECT count(*) AS n FROM relais_messages")

    thread = threading.Thread(target=keep_reading)
    thread.start()
    try:
        one_message(store, b"MSH|first", "first")
        before = _wal_restarts(db)
        for i in range(600):
            one_message(store, b"MSH|" + str(i).encode() * 200, str(i))
        restarts = _wal_restarts(db) - before
    finally:
        stop.set()
        thread.join()
        reader.close()
        store.close()
    assert restarts >= 2
    reopened = EventStore.open(f"sqlite:///{db}", tmp_path / "blobs")
    try:
        assert reopened.query("SELECT count(*) AS n FROM relais_messages")[0]["n"] == 601
        assert reopened.verify_chain().ok
    finally:
        reopened.close()


def test_a_checkpoint_leaves_the_configured_lock_timeout_to_the_commits(tmp_path: Path) -> None:
    store = EventStore.open(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs", lock_timeout=3.5,
                            checkpoints=False)  # fmt: skip
    try:
        one_message(store, b"MSH|one", "1")
        store.recorder.checkpoint()
        with store.recorder.datastore.get_connection(commit=False) as conn:
            assert conn._sqlite_conn.execute("PRAGMA busy_timeout").fetchone()[0] == 3500
    finally:
        store.close()


def test_a_reader_that_holds_its_snapshot_does_not_hold_the_checkpoint_or_the_commits(tmp_path: Path) -> None:
    import sqlite3
    import threading

    db = tmp_path / "store.db"
    store = EventStore.open(f"sqlite:///{db}", tmp_path / "blobs", checkpoints=False)
    slow = sqlite3.connect(db, isolation_level=None)
    done = threading.Event()
    checkpoint = threading.Thread(target=lambda: (store.recorder.checkpoint(), done.set()))
    try:
        one_message(store, b"MSH|one", "1")
        slow.execute("BEGIN")
        assert slow.execute("SELECT count(*) FROM relais_messages").fetchone() == (1,)
        one_message(store, b"MSH|two", "2")  # the slow reader still reads the WAL
        checkpoint.start()
        checkpoint.join(5)  # the store's busy timeout is 10 s: a stuck checkpoint is still here
        assert done.is_set()
        one_message(store, b"MSH|three", "3")
        assert slow.execute("SELECT count(*) FROM relais_messages").fetchone() == (1,)  # its snapshot
        slow.execute("COMMIT")
        assert store.query("SELECT count(*) AS n FROM relais_messages")[0]["n"] == 3
    finally:
        if checkpoint.is_alive():
            slow.execute("COMMIT")  # let it end before its connection is closed
            checkpoint.join()
        slow.close()
        store.close()
