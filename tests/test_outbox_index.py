"""The delivery workers' outbox index against the rule it replaces, written as SQL on a real
SQLite outbox: a delivery is due when its time has come and nothing older of its key is
pending or dead-lettered by a blocking destination."""

from __future__ import annotations

import random
import sqlite3

import pytest

from engine.delivery import DELIVERY_ROWS
from engine.outbox import OPEN_ROWS, OUTBOX_INSERT, OUTBOX_REOPEN, OUTBOX_UPDATE, OutboxIndex
from event_store.recorders import SIDE_TABLES

# The scan the delivery workers ran before the index (bench/RESULTS.md §19).
DUE_BY_SCAN = """
SELECT o.delivery_id FROM relais_outbox o
JOIN (SELECT channel, destination, ordering_key, MIN(seq) AS head FROM relais_outbox
      WHERE state = 'pending' OR (state = 'dead' AND blocks = 1)
      GROUP BY channel, destination, ordering_key) k
  ON o.channel = k.channel AND o.destination = k.destination
 AND o.ordering_key = k.ordering_key AND o.seq = k.head
WHERE o.state = 'pending' AND o.next_attempt_at <= ?
ORDER BY o.seq
"""


def _t(second: int) -> str:
    return f"2026-11-24T10:{second // 60:02d}:{second % 60:02d}.000000+00:00"


class Outbox:
    """A real outbox table and the index, fed the same committed statements."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.db.row_factory = sqlite3.Row
        for sql in SIDE_TABLES:
            self.db.execute(sql.format(blob="BLOB"))
        self.index = OutboxIndex()

    def commit(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        self.db.executemany(sql, rows)
        self.index.committed([(sql, rows)])

    def insert(self, delivery_id: str, key: tuple[str, str, str], seq: int, now: str) -> None:
        row = (delivery_id, "m", *key, seq, "sha", "x", "pending", 0, 0, now, "", now, now)
        self.commit(OUTBOX_INSERT, [row])

    def due_by_scan(self, now: str) -> list[str]:
        return [r[0] for r in self.db.execute(DUE_BY_SCAN, [now])]

    def open_rows(self) -> list[dict[str, object]]:
        return [dict(r) for r in self.db.execute(OPEN_ROWS)]


@pytest.mark.parametrize("seed", range(6))
def test_the_index_finds_the_due_deliveries_the_scan_finds(seed: int) -> None:
    rng = random.Random(seed)
    box = Outbox()
    keys = [("adt", rng.choice(["partner", "gp"]), f"FAC|{p}") for p in range(12)]
    seq = 0
    closed: list[str] = []
    for step in range(120):
        now = _t(step)
        for _ in range(rng.randint(0, 6)):  # the router plans; sometimes from an older position
            seq += 1  # log positions are unique: so are the seqs
            older = (seq - rng.randint(1, 5)) * 100 + seq % 100
            box.insert(f"d{seq}", rng.choice(keys), seq * 100 if rng.random() > 0.1 else older, now)
        if closed and rng.random() < 0.1:  # an operator redelivers
            reopened = rng.sample(closed, min(len(closed), 3))
            box.commit(OUTBOX_REOPEN, [(now, now, d) for d in reopened])
            closed = [d for d in closed if d not in reopened]
        if box.index.unknown:  # what the workers do: read the reopened rows again
            asked = list(box.index.unknown)
            box.index.reloaded(asked, [r for r in box.open_rows() if r["delivery_id"] in asked])
        if rng.random() < 0.1:  # a dead letter that held its key is redelivered too
            held = [r["delivery_id"] for r in box.open_rows() if r["state"] == "dead"]
            if held:
                box.commit(OUTBOX_REOPEN, [(now, now, held[0])])
        taken = box.index.take(now, 10_000)
        assert taken == box.due_by_scan(now), f"step {step}"
        for delivery_id in taken:
            outcome = rng.choice(["delivered", "retry", "retry-now", "dead-blocks", "dead", "not-recorded"])
            if outcome == "not-recorded":  # the store refused the record: due again
                box.index.give_back(delivery_id)
                continue
            state = {"delivered": "delivered", "retry": "pending", "retry-now": "pending"}.get(outcome, "dead")
            next_at = _t(step + rng.randint(1, 4)) if outcome == "retry" else now
            blocks = int(outcome == "dead-blocks")
            box.commit(OUTBOX_UPDATE, [(state, 1, next_at, "", blocks, now, delivery_id)])
            if state != "pending" and not blocks:
                closed.append(delivery_id)
    # Built again from the open rows (a restart), the index agrees with the scan as well.
    fresh = OutboxIndex()
    fresh.load(box.open_rows())
    final = _t(200)
    assert fresh.take(final, 10_000) == box.due_by_scan(final)
    assert len(fresh) == len(box.open_rows())


def test_a_head_the_store_does_not_have_as_pending_holds_its_key_until_read_again() -> None:
    box = Outbox()
    key = ("adt", "partner", "FAC|1")
    box.insert("first", key, 1, _t(0))
    box.insert("second", key, 2, _t(0))
    assert box.index.take(_t(1), 10) == ["first"]
    box.index.doubt("first")  # what the workers do when its row does not come back pending
    box.index.give_back("first")
    assert box.index.take(_t(2), 10) == []  # "second" does not pass it
    box.db.execute("UPDATE relais_outbox SET state = 'delivered' WHERE delivery_id = 'first'")
    asked = list(box.index.unknown)
    box.index.reloaded(asked, [r for r in box.open_rows() if r["delivery_id"] in asked])
    assert box.index.take(_t(3), 10) == ["second"]


def test_the_rows_of_deliveries_to_start_are_read_by_their_id_whatever_the_backlog() -> None:
    """The read of the deliveries an attempt starts goes through the outbox's primary key:
    with its state in the SQL, SQLite (no statistics) read every pending row instead, so each
    start cost more as a partner's backlog grew (bench/RESULTS.md §21)."""
    box = Outbox()
    for seq in range(2000):
        box.insert(f"d{seq}", ("c", "partner", f"k{seq % 50}"), seq, _t(0))
    box.commit(OUTBOX_UPDATE, [("delivered", 1, _t(1), "", 0, _t(1), "d0")])
    ids = ["d0", "d1", "d2"]
    sql = DELIVERY_ROWS.format(",".join("?" * len(ids)))
    plan = " ".join(str(row[3]) for row in box.db.execute(f"EXPLAIN QUERY PLAN {sql}", ids))
    assert "relais_outbox_due" not in plan and "SCAN o" not in plan, plan
    assert {r["delivery_id"] for r in box.db.execute(sql, ids)} == set(ids)  # state is tested by the caller


def test_heads_parked_for_a_busy_destination_let_a_pass_reach_the_others() -> None:
    box = Outbox()
    for n in range(6):  # six keys of a slow partner, older than the archive's two
        box.insert(f"slow-{n}", ("c", "partner", f"k{n}"), n, _t(0))
    box.insert("arch-0", ("c", "archive", "k0"), 10, _t(0))
    box.insert("arch-1", ("c", "archive", "k1"), 11, _t(0))
    first = box.index.take(_t(1), 3)
    assert first == ["slow-0", "slow-1", "slow-2"]
    for delivery_id in first[1:]:  # the partner has all it may have: set aside
        box.index.park(delivery_id, ("c", "partner"))
    for delivery_id in box.index.take(_t(1), 3):
        box.index.park(delivery_id, ("c", "partner"))
    # Past the partner's heads, the archive's: not behind them at every pass.
    assert box.index.take(_t(1), 3) == ["arch-0", "arch-1"]
    box.index.unpark(("c", "partner"), 2)  # two attempts of the partner ended
    assert box.index.take(_t(1), 10) == ["slow-1", "slow-2"]
    box.index.requeue_all()  # routes reloaded: every pending head is due again, parked or not
    assert set(box.index.take(_t(1), 10)) == {f"slow-{n}" for n in range(6)} | {"arch-0", "arch-1"}
