"""Recorder benchmark: durable events/s inserting ready StoredEvents (1.5 KB state) in batches.

eventsourcing's own SQLite and PostgreSQL recorders vs eventsourcing-sqlalchemy on both databases.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from eventsourcing.persistence import StoredEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "test"}
SCHEMA = "relais_bench_recorders"  # dropped before and after: never touches the tests' tables
STATE_SIZE = 1500


def make_state(i: int) -> bytes:
    """A JSON body of ~1.5 KB, like an encoded MessageReceived."""
    body = {"recorded_at": "2026-11-23T10:15:00.000000+00:00", "listener": "mllp", "n": i,
            "metadata": {"control_id": uuid.uuid4().hex, "pad": ""}}  # fmt: skip
    raw = orjson.dumps(body)
    body["metadata"]["pad"] = "x" * (STATE_SIZE - len(raw))  # type: ignore[index]
    return orjson.dumps(body)


def batches(size: int) -> Iterator[list[StoredEvent]]:
    i = 0
    while True:
        out = []
        for _ in range(size):
            i += 1
            out.append(StoredEvent(uuid.uuid4(), 1, "relais.MessageReceived", make_state(i)))
        yield out


Insert = Callable[[list[StoredEvent]], Any]


@dataclass
class Backend:
    name: str
    opener: Callable[[ExitStack, Path], Insert]


def open_es_sqlite(stack: ExitStack, tmp: Path) -> Insert:
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteConnectionPool, SQLiteDatastore

    class FullPool(SQLiteConnectionPool):
        """The library's pool (WAL), with synchronous=FULL spelled out."""

        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn._sqlite_conn.execute("PRAGMA synchronous=FULL")
            return conn

    path = str(tmp / "es_sqlite.db")
    ds = SQLiteDatastore(path, pool_size=2)
    ds.pool.close()
    ds.pool = FullPool(db_name=path, pool_size=2)
    stack.callback(ds.close)
    rec = SQLiteApplicationRecorder(ds)
    rec.create_table()
    return rec.insert_events


def open_relais_sqlite(stack: ExitStack, tmp: Path) -> Insert:
    """Relais's recorder (the library's, plus payload and message-index rows in the same transaction)."""
    from event_store.recorders import SideRows, open_recorder

    rec = open_recorder(f"sqlite:///{tmp / 'relais.db'}")
    stack.callback(rec.datastore.close)

    def insert(events: list[StoredEvent]) -> Any:
        side = SideRows()
        for e in events:
            sha = os.urandom(32).hex()
            mid = str(e.originator_id)
            side.payloads.append((sha, "application/hl7-v2", STATE_SIZE, e.state))
            cid = uuid.uuid4().hex[:20]
            side.messages.append(
                (mid, "2026-11-23T10:15:00", "mllp", "mllp", "127.0.0.1:1", "APP|FAC", cid, "ADT", "A01",
                 sha, 1, "accepted", "AA", "", "", "")
            )  # fmt: skip
            side.identifiers.append((mid, "123456", "PI", "1.2.250.1.71.4.2.2"))
        return rec.insert_events(events, side=side)

    return insert


def open_sa_sqlite(stack: ExitStack, tmp: Path) -> Insert:
    from eventsourcing_sqlalchemy.datastore import SQLAlchemyDatastore
    from eventsourcing_sqlalchemy.recorders import SQLAlchemyApplicationRecorder
    from sqlalchemy import event

    ds = SQLAlchemyDatastore(url=f"sqlite:///{tmp / 'sa_sqlite.db'}")
    assert ds.engine is not None
    stack.callback(ds.engine.dispose)  # type: ignore[union-attr]

    @event.listens_for(ds.engine, "connect")
    def _full(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.execute("PRAGMA synchronous=FULL")

    rec = SQLAlchemyApplicationRecorder(ds, events_table_name="bench_sa_sqlite_events")
    rec.create_table()
    return rec.insert_events


@contextmanager
def pg_schema() -> Iterator[None]:
    import psycopg

    def drop() -> None:
        with psycopg.connect(**PG, autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")

    drop()
    with psycopg.connect(**PG, autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    try:
        yield
    finally:
        drop()


def open_es_pg(stack: ExitStack, _: Path) -> Insert:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    stack.enter_context(pg_schema())
    ds = PostgresDatastore(
        dbname=PG["dbname"], host=PG["host"], port=PG["port"], user=PG["user"], password="",
        pool_size=2, schema=SCHEMA,
    )  # fmt: skip
    stack.callback(ds.close)
    rec = PostgresApplicationRecorder(ds, events_table_name="bench_es_events")
    rec.create_table()
    return rec.insert_events


def open_sa_pg(stack: ExitStack, _: Path) -> Insert:
    from eventsourcing_sqlalchemy.datastore import SQLAlchemyDatastore
    from eventsourcing_sqlalchemy.recorders import SQLAlchemyApplicationRecorder

    stack.enter_context(pg_schema())
    ds = SQLAlchemyDatastore(url="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert ds.engine is not None
    stack.callback(ds.engine.dispose)  # type: ignore[union-attr]
    rec = SQLAlchemyApplicationRecorder(ds, events_table_name="bench_sa_pg_events", schema_name=SCHEMA)
    rec.create_table()
    return rec.insert_events


BACKENDS = [
    Backend("eventsourcing SQLite", open_es_sqlite),
    Backend("eventsourcing-sqlalchemy SQLite", open_sa_sqlite),
    Backend("eventsourcing PostgreSQL", open_es_pg),
    Backend("eventsourcing-sqlalchemy PostgreSQL", open_sa_pg),
    Backend("Relais recorder SQLite (+side rows)", open_relais_sqlite),
]


def measure(insert: Insert, size: int, seconds: float) -> tuple[float, float]:
    """(events/s, mean ms per transaction) after a short warm-up."""
    gen = batches(size)
    ready = [next(gen) for _ in range(max(20, int(4000 / size)))]  # built before timing
    for b in ready[:5]:
        insert(b)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for b in ready[5:]:
        insert(b)
        n += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    return n * size / elapsed, elapsed / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    ap.add_argument("--only", help="run only backends whose name contains this")
    args = ap.parse_args()
    print(
        f"# StoredEvent state {STATE_SIZE} B, one transaction per batch; SQLite WAL + synchronous=FULL, "
        f"PostgreSQL 127.0.0.1 (fsync=on, synchronous_commit=on); {args.seconds}s each",
        flush=True,
    )
    rows: list[tuple[str, list[tuple[float, float]]]] = []
    for backend in BACKENDS:
        if args.only and args.only.lower() not in backend.name.lower():
            continue
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-rec-") as d, ExitStack() as stack:
            insert = backend.opener(stack, Path(d))
            for size in args.batches:
                results.append(measure(insert, size, args.seconds))
        rows.append((backend.name, results))
        print(f"  {backend.name}: " + "  ".join(f"{r:.0f} ev/s" for r, _ in results), file=sys.stderr)
    head = f"{'recorder':<38}" + "".join(f"{f'batch {b} ev/s':>15}{'ms/tx':>8}" for b in args.batches)
    print(head)
    print("-" * len(head))
    for name, results in rows:
        print(f"{name:<38}" + "".join(f"{rate:>15.0f}{ms:>8.2f}" for rate, ms in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
