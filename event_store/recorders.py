"""eventsourcing's own SQLite and PostgreSQL recorders, extended to write Relais's side
tables (inline payloads, message index) in the same transaction as the events.

The library's `_insert_events` hook runs inside the recorder's transaction on both
backends; we add our rows there, so an event, its payload and its index row commit or
fail together.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteDatastore,
)

__all__ = ["SideRows", "open_recorder"]

# Our side tables. Written with '?' placeholders and portable SQL (SQLite ≥ 3.24 and
# PostgreSQL both take ON CONFLICT DO NOTHING); '?' becomes '%s' for psycopg.
SIDE_TABLES = [
    """CREATE TABLE IF NOT EXISTS relais_payloads (
        sha256 TEXT PRIMARY KEY, content_type TEXT NOT NULL, size BIGINT NOT NULL,
        data {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS relais_messages (
        message_id TEXT PRIMARY KEY, received_at TEXT NOT NULL, listener TEXT NOT NULL,
        protocol TEXT NOT NULL, peer TEXT NOT NULL, sender TEXT NOT NULL,
        control_id TEXT NOT NULL, message_type TEXT NOT NULL, trigger_event TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL, payload_inline INTEGER NOT NULL,
        status TEXT NOT NULL, ack_code TEXT NOT NULL,
        error_code TEXT NOT NULL, reason TEXT NOT NULL, location TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_messages_sender_ctl ON relais_messages (sender, control_id)",
    "CREATE INDEX IF NOT EXISTS relais_messages_received ON relais_messages (received_at)",
    """CREATE TABLE IF NOT EXISTS relais_identifiers (
        message_id TEXT NOT NULL, value TEXT NOT NULL, id_type TEXT NOT NULL,
        authority TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_identifiers_value ON relais_identifiers (value)",
    # Follower positions (router...), written with the events they produced: exactly once.
    "CREATE TABLE IF NOT EXISTS relais_tracking (name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    # The outbox: one row per planned delivery, kept in step with the delivery events.
    """CREATE TABLE IF NOT EXISTS relais_outbox (
        delivery_id TEXT PRIMARY KEY, message_id TEXT NOT NULL, channel TEXT NOT NULL,
        destination TEXT NOT NULL, ordering_key TEXT NOT NULL, seq BIGINT NOT NULL,
        payload_sha256 TEXT NOT NULL, content_type TEXT NOT NULL, state TEXT NOT NULL,
        blocks INTEGER NOT NULL, attempts INTEGER NOT NULL, next_attempt_at TEXT NOT NULL,
        last_error TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_outbox_due ON relais_outbox (state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS relais_outbox_key ON relais_outbox (destination, ordering_key, seq)",
    # Operators' requests (redeliver...) queued by the CLI, carried out by the engine's writer.
    """CREATE TABLE IF NOT EXISTS relais_requests (
        request_id TEXT PRIMARY KEY, kind TEXT NOT NULL, args TEXT NOT NULL,
        requested_by TEXT NOT NULL, reason TEXT NOT NULL, created_at TEXT NOT NULL,
        done_at TEXT, result TEXT)""",
    # What a destination is told about a delivery's payload (document filename...), JSON.
    "CREATE TABLE IF NOT EXISTS relais_delivery_details (delivery_id TEXT PRIMARY KEY, details TEXT NOT NULL)",
]
INSERT_PAYLOAD = (
    "INSERT INTO relais_payloads (sha256, content_type, size, data) VALUES (?,?,?,?) ON CONFLICT DO NOTHING"
)
INSERT_MESSAGE = "INSERT INTO relais_messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"

# One VALUES group of '?' in an INSERT (what follows it, e.g. ON CONFLICT, is kept).
_VALUES_GROUP = re.compile(r"^(\s*INSERT\b.*?\bVALUES\s*)(\((?:\s*\?\s*,)*\s*\?\s*\))(.*)$", re.S | re.I)
# An UPDATE of one row by its key: `UPDATE t SET a = ?, b = ? WHERE k = ?` (constants allowed
# among the assignments, as in `state = 'pending'`).
_KEYED_UPDATE = re.compile(r"^\s*UPDATE\s+(\w+)\s+SET\s+(.*?)\s+WHERE\s+(\w+)\s*=\s*\?\s*$", re.S | re.I)
_ASSIGNMENT = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$", re.S)
# Rows per multi-row statement: far below SQLite's 32,766 bound parameters.
_ROWS_PER_INSERT = 200


def _insert_rows(c: SQLiteCursor, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Run an INSERT, or an UPDATE by primary key, for many rows in as few statements as
    possible.

    The sqlite3 module releases the GIL around every step of a statement, so `executemany`
    hands the GIL to the busy event loop once per row and waits up to the switch interval
    to get it back; a multi-row `INSERT ... VALUES (...), (...)` is one step for all its
    rows, and so is `UPDATE ... FROM (VALUES ...)` (a commit's delivery outcomes: 16 rows
    were 16 handoffs). Rows are written in their order (rowids follow it). Any other
    statement goes through `executemany`.
    """
    many = _multi_row(c, sql, rows) if len(rows) > 1 else None
    if many is None:
        c.executemany(sql, rows)
        return
    head, group, tail = many
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        c.execute(f"{head}{','.join([group] * len(chunk))}{tail}", [v for row in chunk for v in row])


def _multi_row(c: SQLiteCursor, sql: str, rows: Sequence[tuple[Any, ...]]) -> tuple[str, str, str] | None:
    """`sql` as (head, one VALUES group, tail) to repeat per row, or None if it has no such form."""
    form = _multi_row_form(sql)
    if form is None:
        return None
    head, group, tail, keyed = form
    if keyed is not None:
        # One statement gives the same result as one per row only if each row names one
        # row of the table (its primary key) and no two name the same.
        table, key = keyed
        if _primary_key(c, table) != key or len({row[-1] for row in rows}) < len(rows):
            return None
    return head, group, tail


_primary_keys: dict[str, str | None] = {}


def _primary_key(c: SQLiteCursor, table: str) -> str | None:
    """The column that is the whole primary key of `table` (None: none, or several)."""
    if table not in _primary_keys:
        c.execute(f"PRAGMA table_info({table})")
        info = c.fetchall()
        if not info:
            return None  # no such table (yet): the statement will say so
        keys = [row[1] for row in info if row[5]]
        _primary_keys[table] = keys[0] if len(keys) == 1 else None
    return _primary_keys[table]


@functools.lru_cache(maxsize=64)
def _multi_row_form(sql: str) -> tuple[str, str, str, tuple[str, str] | None] | None:
    match = _VALUES_GROUP.match(sql)
    if match is not None:
        head, group, tail = match.groups()
        return head, group, tail, None
    match = _KEYED_UPDATE.match(sql)
    if match is None:
        return None
    table, assignments, key = match.groups()
    sets, n = [], 0
    for part in assignments.split(","):
        target = _ASSIGNMENT.match(part)
        if target is None or part.count("'") not in (0, 2):
            return None  # a constant with a comma in it: not a form read here
        column, value = target.groups()
        if column == key:
            return None
        if value == "?":
            n += 1
            value = f"v.column{n}"
        elif "?" in value:
            return None
        sets.append(f"{column} = {value}")
    return (
        f"UPDATE {table} SET {', '.join(sets)} FROM (VALUES ",
        "(" + ",".join("?" * (n + 1)) + ")",
        f") AS v WHERE {table}.{key} = v.column{n + 1}",
        (table, key),
    )


@dataclass
class SideRows:
    """Rows to write beside one batch of events."""

    payloads: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    messages: list[tuple[Any, ...]] = field(default_factory=list)
    statements: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)  # '?' style


# How long a checkpoint may hold commits back while it waits for the WAL to be free.
RESTART_WAIT_MS = 50


class _DurableSQLitePool(SQLiteConnectionPool):
    """WAL with synchronous=FULL: a commit is on disk when it returns."""

    busy_timeout_ms = 10000.0

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        conn._sqlite_conn.execute("PRAGMA synchronous=FULL")
        # A multi-row INSERT inside a large transaction keeps a statement journal (to undo
        # that statement alone on a constraint error); past 64 KB SQLite spills it to a
        # temporary file in /var/tmp, created, written and deleted at every commit. In
        # memory, a commit of ~30 items went from 14 to 10 ms (bench/RESULTS.md §19).
        conn._sqlite_conn.execute("PRAGMA temp_store=MEMORY")
        conn._sqlite_conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        # Checkpoints (which fsync the database file) run on their own thread, not inside
        # the commit that happens to cross the threshold: see EventStore._checkpoint_loop.
        conn._sqlite_conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn


class RelaisSQLiteRecorder(SQLiteApplicationRecorder):
    dialect = "sqlite"

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            *(s.format(blob="BLOB") for s in SIDE_TABLES),
        ]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        side: SideRows | None = kwargs.get("side")
        if side is not None:
            if side.payloads:
                _insert_rows(c, INSERT_PAYLOAD, side.payloads)
            if side.messages:
                _insert_rows(c, INSERT_MESSAGE, side.messages)
            for sql, rows in side.statements:
                _insert_rows(c, sql, rows)
        if not stored_events:
            return []
        # The library inserts one event per statement to read each rowid; one writer holds
        # the write transaction, so the rowids of one multi-row INSERT are consecutive.
        _insert_rows(
            c,
            self.insert_events_statement,
            [(s.originator_id.hex if isinstance(s.originator_id, UUID) else s.originator_id,
              s.originator_version, s.topic, s.state) for s in stored_events],
        )  # fmt: skip
        c.execute("SELECT last_insert_rowid()")
        last = int(c.fetchone()[0])
        return list(range(last - len(stored_events) + 1, last + 1))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(sql, params)
            return [dict(row) for row in c.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(sql, params)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file, then have the next commit write the WAL from
        its start again.

        A PASSIVE checkpoint copies without blocking anyone, but never lets the WAL start
        over while commits keep coming: under steady load it grew by ~60 MB a second
        (1 GB in 18 s of the e2e bench), each commit extending the file (new blocks zeroed
        by the kernel) and every read searching a longer WAL index. So PASSIVE does the bulk
        of the copying, then RESTART copies what came meanwhile and waits, at most
        `RESTART_WAIT_MS` for the writer and the readers, until no one reads the WAL: the
        next commit then writes at its start, into blocks the file has already.
        """
        with self.datastore.get_connection(commit=False) as conn:
            db = conn._sqlite_conn
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            lock_timeout = int(db.execute("PRAGMA busy_timeout").fetchone()[0])  # [store] lock_timeout
            db.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            try:
                db.execute("PRAGMA wal_checkpoint(RESTART)")
            finally:
                db.execute(f"PRAGMA busy_timeout={lock_timeout}")


class RelaisPostgresRecorder(PostgresApplicationRecorder):
    dialect = "postgres"

    def __init__(self, datastore: PostgresDatastore) -> None:
        super().__init__(datastore)
        from psycopg.sql import SQL, Composed

        self.sql_create_statements.extend(Composed([SQL(s.format(blob="BYTEA"))]) for s in SIDE_TABLES)

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        side: SideRows | None = kwargs.get("side")
        if side is None:
            return
        if side.payloads:
            curs.executemany(INSERT_PAYLOAD.replace("?", "%s"), side.payloads)
        if side.messages:
            curs.executemany(INSERT_MESSAGE.replace("?", "%s"), side.messages)
        for sql, rows in side.statements:
            curs.executemany(sql.replace("?", "%s"), rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(sql.replace("?", "%s"), list(params))
            return [dict(row) for row in curs.fetchall()]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(sql.replace("?", "%s"), list(params))

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""


Recorder = RelaisSQLiteRecorder | RelaisPostgresRecorder


def open_recorder(url: str, lock_timeout: float = 10.0) -> Recorder:
    """A recorder for `sqlite:///path/to/file.db` or `postgresql://user@host:port/db`."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"SQLite URL needs a file path: {url!r} (sqlite:///data/relais.db)")
        if sqlite3.sqlite_version_info < (3, 24):
            raise RuntimeError("SQLite ≥ 3.24 is required (ON CONFLICT)")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        datastore = SQLiteDatastore(db_name=path, pool_size=4, max_overflow=8)
        datastore.pool.close()
        pool = _DurableSQLitePool(db_name=path, pool_size=4, max_overflow=8)
        pool.busy_timeout_ms = lock_timeout * 1000
        datastore.pool = pool
        sqlite_recorder = RelaisSQLiteRecorder(datastore)
        sqlite_recorder.create_table()
        return sqlite_recorder
    if parsed.scheme in ("postgresql", "postgres"):
        pg = PostgresDatastore(
            dbname=(parsed.path or "/").lstrip("/") or "postgres",
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            pool_size=4,
            max_overflow=4,
        )
        pg_recorder = RelaisPostgresRecorder(pg)
        pg_recorder.create_table()
        return pg_recorder
    raise ValueError(f"unsupported store URL scheme {parsed.scheme!r}: use sqlite:/// or postgresql://")
