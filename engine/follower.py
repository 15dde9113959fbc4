"""Followers of the log (router, search index): read after a tracked position, commit what
they derive together with their new position through the one writer: exactly once.

    class Indexer(LogFollower):
        name = "message-search"
        def plan(self, after: int) -> tuple[Appendix, int]: ...
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from engine.ingest import Appender, Appendix
from engine.tasks import cancel_and_wait, in_thread
from event_store import EventStore

__all__ = ["TRACKING_UPSERT", "LogFollower"]

log = structlog.get_logger("relais.follower")

TRACKING_UPSERT = (
    "INSERT INTO relais_tracking (name, position) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)


class LogFollower:
    name = "follower"
    # At most one commit of this follower per interval: followers must not double the
    # writer's commits under load (each of theirs covers up to `batch_size` messages).
    min_interval = 0.0
    # After a read that found nothing of its topics, wait this long before reading again:
    # a follower of rare events should not query the store after every commit of others.
    idle_interval = 0.0
    # With nothing new, read again after the next commit or after this long at the latest
    # (a follower whose work also comes from the clock sets it to its tick).
    wake_interval = 1.0
    # Plan the next round while the previous one commits (see `_run`): only for a follower
    # whose `plan` does not read what its own previous appendix writes.
    pipelined = False

    def __init__(self, store: EventStore, ingestor: Appender) -> None:
        self.store = store
        self.ingestor = ingestor
        self.position = 0
        self.batch_size = 500
        self._signal = ingestor.commit_signal()
        self._task: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[bool] | None = None  # the append of the round planned last

    def plan(self, after: int) -> tuple[Appendix, int]:
        """On a worker thread: what to append for the log after `after`, and the new position.
        The appendix must include the tracking upsert (see `track`)."""
        raise NotImplementedError

    def select(self, after: int, topics: list[str]) -> tuple[list[Any], int]:
        """Notifications of `topics` after `after`, and how far the log was read.

        A follower of a rare topic (studies, mails) moves past the rest of the log: without
        this it would scan everything since its last match again after every commit."""
        head = self.store.recorder.max_notification_id() or 0
        if head <= after:
            return [], after
        notes = list(
            self.store.recorder.select_notifications(start=after + 1, limit=self.batch_size, stop=head, topics=topics)
        )
        return notes, notes[-1].id if len(notes) == self.batch_size else head

    def committed(self, appendix: Appendix) -> None:
        """On the loop, after the appendix is durable (e.g. wake who waits for it)."""

    def track(self, appendix: Appendix, position: int) -> None:
        appendix.statements.append((TRACKING_UPSERT, [(self.name, position)]))

    async def start(self) -> None:
        self.position = await in_thread(self._load_position)
        self._task = asyncio.create_task(self._run(), name=f"relais-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._sending is not None:  # a pipelined round's append: its outcome, or 10 s
            await asyncio.wait({self._sending}, timeout=10)
            await cancel_and_wait(self._sending)
            self._sending = None

    def _load_position(self) -> int:
        rows = self.store.query("SELECT position FROM relais_tracking WHERE name = ?", [self.name])
        return int(rows[0]["position"]) if rows else 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # A pipelined follower plans its next round while the previous one's append is
        # being committed; that append must succeed before the next is sent, else the
        # plan is dropped and made again from the position committed: exactly once holds.
        planned = self.position  # where the next round reads from
        while True:
            started = loop.time()
            planning_failed = False
            try:
                appendix, position = await in_thread(self.plan, planned)
            except Exception as e:
                log.error("follower_failed", follower=self.name, error=type(e).__name__, detail=str(e)[:200])
                appendix, position, planning_failed = Appendix(), planned, True
                await asyncio.sleep(1.0)
            if self._sending is not None:
                sent = await self._sending
                self._sending = None
                if not sent:  # the store is unavailable: the same part of the log again later
                    planned = self.position
                    await asyncio.sleep(1.0)
                    continue
            if planning_failed:
                continue
            if not (appendix.events or appendix.statements or appendix.payloads):
                moved, self.position = position != self.position, position
                planned = position
                if moved:  # only read past other topics: nothing to record
                    if self.idle_interval:
                        await asyncio.sleep(self.idle_interval)
                    continue
                self._signal.clear()
                try:
                    async with asyncio.timeout(self.wake_interval):
                        await self._signal.wait()
                except TimeoutError:
                    pass
                continue
            self._sending = asyncio.create_task(self._append(appendix, position))
            planned = position
            if not self.pipelined:
                sent = await self._sending
                self._sending = None
                if not sent:
                    planned = self.position
                    await asyncio.sleep(1.0)
                    continue
            # The interval counts from the start of this round: its read and planning (and
            # commit, unless pipelined) took part of it already (all of it, under load).
            rest = self.min_interval - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _append(self, appendix: Appendix, position: int) -> bool:
        try:
            await self.ingestor.append(appendix)
        except Exception as e:
            log.error("follower_not_recorded", follower=self.name, error=type(e).__name__)
            return False
        self.position = position
        self.committed(appendix)
        return True
