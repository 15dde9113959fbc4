"""The outbox's statements, and the open deliveries of every key held in memory.

Every change to the outbox is a statement of an `Appendix` committed by the single writer:
rows inserted by the followers that plan deliveries (router, study router, MDNs), outcomes
recorded by the delivery workers, deliveries reopened by an operator's redeliver. The
delivery workers see each commit (`Ingestor.on_commit`) and keep, per key (channel,
destination, ordering key), its open deliveries in `seq` order: the head of a key is its
oldest delivery still pending, or dead-lettered by a destination that blocks. Finding what
is due is then a look at the heads that are ready, not a scan of every open row: with
100,000 deliveries waiting (a partner down for an hour), the query this replaces took
170 ms, run every few milliseconds while the backlog drained (bench/RESULTS.md §19).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["OPEN_ROWS", "OUTBOX_INSERT", "OUTBOX_REOPEN", "OUTBOX_UPDATE", "OutboxIndex"]

# (delivery_id, message_id, channel, destination, ordering_key, seq, payload_sha256,
#  content_type, state, blocks, attempts, next_attempt_at, last_error, created_at, updated_at)
OUTBOX_INSERT = "INSERT INTO relais_outbox VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
# (state, attempts, next_attempt_at, last_error, blocks, updated_at, delivery_id)
OUTBOX_UPDATE = (
    "UPDATE relais_outbox SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
    "blocks = ?, updated_at = ? WHERE delivery_id = ?"
)
# An operator's redeliver: (next_attempt_at, updated_at, delivery_id)
OUTBOX_REOPEN = (
    "UPDATE relais_outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
    "blocks = 0, last_error = '', updated_at = ? WHERE delivery_id = ?"
)
# The open deliveries, as the index holds them (`relais_outbox_due` index on state).
OPEN_ROWS = (
    "SELECT delivery_id, channel, destination, ordering_key, seq, state, next_attempt_at FROM relais_outbox "
    "WHERE (state = 'pending' OR (state = 'dead' AND blocks = 1))"
)

Key = tuple[str, str, str]


@dataclass(slots=True)
class _Open:
    seq: int
    delivery_id: str
    pending: bool  # False: dead-lettered by a blocking destination, holding its key
    next_attempt_at: str


class OutboxIndex:
    """Open deliveries per key, in `seq` order, and the heads ready to be attempted.

    Not thread-safe: used from the event loop only. A head is in at most one of the two
    queues (`_ready` by seq, `_later` by next attempt time), both checked again when popped.
    """

    def __init__(self) -> None:
        self._keys: dict[Key, list[_Open]] = {}
        self._key_of: dict[str, Key] = {}
        self._ready: list[tuple[int, str]] = []
        self._later: list[tuple[str, int, str]] = []
        self._queued: set[str] = set()
        # Due heads set aside while their destination has all the attempts it may have (a
        # slow partner): out of the queues, so that a pass reaches the heads behind them.
        self._parked: dict[Any, deque[str]] = {}
        # Reopened deliveries this index did not hold: their rows are read from the store.
        self.unknown: set[str] = set()

    def __len__(self) -> int:
        return len(self._key_of)

    def load(self, rows: Iterable[dict[str, Any]]) -> None:
        """Open rows (OPEN_ROWS) as the store has them: added, or updated when held."""
        for r in rows:
            delivery_id = r["delivery_id"]
            self.unknown.discard(delivery_id)
            if delivery_id in self._key_of:
                self._set(delivery_id, r["state"], True, r["next_attempt_at"])
                continue
            key = (r["channel"], r["destination"], r["ordering_key"])
            self._add(key, int(r["seq"]), delivery_id, r["state"] == "pending", r["next_attempt_at"])

    def reloaded(self, asked: Iterable[str], rows: Sequence[dict[str, Any]]) -> None:
        """The rows read again for `asked` (OPEN_ROWS): those not among them are closed."""
        self.load(rows)
        found = {r["delivery_id"] for r in rows}
        for delivery_id in asked:
            self.unknown.discard(delivery_id)
            if delivery_id not in found:
                self._set(delivery_id, "closed", False, "")

    def doubt(self, delivery_id: str) -> None:
        """The store does not have this head as the index does: it holds its key (no later
        delivery may pass it) until its row is read again."""
        head = self._head_of(delivery_id)
        if head is not None:
            head.pending = False
        self.unknown.add(delivery_id)

    def key_of(self, delivery_id: str) -> Key | None:
        return self._key_of.get(delivery_id)

    def committed(self, statements: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        """Apply the outbox statements of one committed appendix."""
        for sql, rows in statements:
            if sql is OUTBOX_INSERT or sql == OUTBOX_INSERT:
                for r in rows:
                    if r[8] == "pending":
                        self._add((r[2], r[3], r[4]), int(r[5]), r[0], True, r[11])
            elif sql is OUTBOX_UPDATE or sql == OUTBOX_UPDATE:
                for state, _attempts, next_at, _error, blocks, _updated, delivery_id in rows:
                    self._set(delivery_id, state, bool(blocks), next_at)
            elif sql is OUTBOX_REOPEN or sql == OUTBOX_REOPEN:
                for next_at, _updated, delivery_id in rows:
                    self._set(delivery_id, "pending", False, next_at)

    def take(self, now: str, limit: int) -> list[str]:
        """Up to `limit` due heads, oldest first, taken out of the queues: each must be given
        back (`give_back`, `park`) or settled by a commit."""
        later = self._later
        while later and later[0][0] <= now:
            _, seq, delivery_id = heapq.heappop(later)
            heapq.heappush(self._ready, (seq, delivery_id))
        taken: list[str] = []
        ready = self._ready
        while ready and len(taken) < limit:
            _, delivery_id = heapq.heappop(ready)
            self._queued.discard(delivery_id)
            head = self._head_of(delivery_id)
            if head is None or not head.pending:
                continue  # settled or dead since it was queued
            if head.next_attempt_at > now:
                self._queue(head)
                continue
            taken.append(delivery_id)
        return taken

    def give_back(self, delivery_id: str) -> None:
        """A head taken and not attempted, or whose outcome was not recorded: due again."""
        head = self._head_of(delivery_id)
        if head is not None and head.pending:
            self._queue(head)

    def park(self, delivery_id: str, group: Any) -> None:
        """A head taken and not attempted because `group` (its destination) is busy: it waits
        out of the queues until `unpark(group)`."""
        self._parked.setdefault(group, deque()).append(delivery_id)

    def unpark(self, group: Any, count: int) -> None:
        """Up to `count` heads parked for `group` into the queues again, oldest first."""
        parked = self._parked.get(group)
        if not parked:
            return
        for _ in range(min(count, len(parked))):
            self.give_back(parked.popleft())
        if not parked:
            del self._parked[group]

    def requeue_all(self) -> None:
        """Every pending head into the queues again (after the destinations changed)."""
        self._parked.clear()
        for entries in self._keys.values():
            if entries[0].pending:
                self._queue(entries[0])

    def next_due(self) -> str | None:
        """When the earliest retry waiting in the queues comes due."""
        return self._later[0][0] if self._later else None

    # -- internals -----------------------------------------------------------------------

    def _head_of(self, delivery_id: str) -> _Open | None:
        key = self._key_of.get(delivery_id)
        if key is None:
            return None
        head = self._keys[key][0]
        return head if head.delivery_id == delivery_id else None

    def _queue(self, entry: _Open) -> None:
        if entry.delivery_id in self._queued:
            return
        self._queued.add(entry.delivery_id)
        heapq.heappush(self._later, (entry.next_attempt_at, entry.seq, entry.delivery_id))

    def _add(self, key: Key, seq: int, delivery_id: str, pending: bool, next_at: str) -> None:
        if delivery_id in self._key_of:
            return
        entry = _Open(seq, delivery_id, pending, next_at)
        entries = self._keys.setdefault(key, [])
        if not entries or entries[-1].seq <= seq:
            entries.append(entry)
        else:  # planned by another follower, from an older log position
            entries.insert(next(i for i, e in enumerate(entries) if e.seq > seq), entry)
        self._key_of[delivery_id] = key
        if entries[0] is entry and pending:
            self._queue(entry)

    def _set(self, delivery_id: str, state: str, blocks: bool, next_at: str) -> None:
        key = self._key_of.get(delivery_id)
        if key is None:
            if state == "pending" or (state == "dead" and blocks):
                self.unknown.add(delivery_id)  # reopened: its key and seq are in the store
            return
        entries = self._keys[key]
        index = next(i for i, e in enumerate(entries) if e.delivery_id == delivery_id)
        entry = entries[index]
        if state == "pending" or (state == "dead" and blocks):
            entry.pending = state == "pending"
            entry.next_attempt_at = next_at
            if index == 0 and entry.pending:
                self._queue(entry)
            return
        del entries[index]  # delivered, or dead without holding its key
        del self._key_of[delivery_id]
        if not entries:
            del self._keys[key]
        elif index == 0 and entries[0].pending:
            self._queue(entries[0])
