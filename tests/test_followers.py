"""Followers of the log stop cleanly: the engine may close the store right after."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from engine.follower import LogFollower
from engine.ingest import Appendix, Ingestor, IngestUnavailable, Submission
from event_store import EventStore


class SlowFollower(LogFollower):
    """Reads the store after a pause, like a follower caught in a long plan at shutdown."""

    name = "slow"

    def __init__(self, store: EventStore, ingestor: Ingestor) -> None:
        super().__init__(store, ingestor)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.outcome: list[object] = []

    def plan(self, after: int) -> tuple[Appendix, int]:
        self.entered.set()
        self.release.wait(10)
        try:
            self.outcome.append(self.store.query("SELECT count(*) AS n FROM relais_tracking")[0]["n"])
        except Exception as e:  # a closed store
            self.outcome.append(e)
        return Appendix(), after


def test_stopping_a_follower_waits_for_its_read_before_the_store_closes(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, list[object]]:
        store = EventStore.open(f"sqlite:///{tmp_path / 'relais.db'}", tmp_path / "blobs")
        ingestor = Ingestor(store)
        await ingestor.start()
        follower = SlowFollower(store, ingestor)
        await follower.start()
        await asyncio.to_thread(follower.entered.wait, 10)
        stopping = asyncio.ensure_future(follower.stop())
        await asyncio.sleep(0.2)
        returned_early = stopping.done()  # the read is still under way
        follower.release.set()
        await stopping
        await ingestor.stop()
        store.close()  # what the engine does next
        return returned_early, follower.outcome

    returned_early, outcome = asyncio.run(scenario())
    assert not returned_early
    assert outcome == [0]


class Chunks(LogFollower):
    """Records each MessageReceived of the log in a table of its own, two per round, planning
    the next round while the previous one commits (as the router does)."""

    name = "chunks"
    pipelined = True

    def plan(self, after: int) -> tuple[Appendix, int]:
        notes = list(self.store.recorder.select_notifications(start=after + 1, limit=2))
        if not notes:
            return Appendix(), after
        appendix = Appendix(statements=[("INSERT INTO seen (position) VALUES (?)", [(n.id,) for n in notes])])
        self.track(appendix, notes[-1].id)
        return appendix, notes[-1].id


class RefusesOnce:
    """The Ingestor, except that its second append is refused (a store unavailable a moment)."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.appends = 0

    async def append(self, appendix: Appendix) -> None:
        self.appends += 1
        if self.appends == 2:
            await asyncio.sleep(0.05)  # the next round is planned meanwhile
            raise IngestUnavailable("refused for the test")
        await self.ingestor.append(appendix)

    def commit_signal(self) -> asyncio.Event:
        return self.ingestor.commit_signal()

    def on_commit(self, watcher) -> None:
        self.ingestor.on_commit(watcher)


def test_a_pipelined_follower_whose_append_is_refused_plans_that_part_again(tmp_path: Path) -> None:
    """The round planned while the refused append was under way is dropped, not sent: every
    position is recorded once, none skipped, in the log's order."""

    async def scenario() -> tuple[list[int], list[int], int]:
        store = EventStore.open(f"sqlite:///{tmp_path / 'relais.db'}", tmp_path / "blobs")
        store.execute("CREATE TABLE seen (position INTEGER NOT NULL)")
        ingestor = Ingestor(store)
        await ingestor.start()
        for n in range(9):
            await ingestor.submit(Submission("mllp", "mllp", "127.0.0.1:1", f"message {n}".encode(), "text/plain"))
        flaky = RefusesOnce(ingestor)
        follower = Chunks(store, flaky)
        await follower.start()
        head = store.recorder.max_notification_id()
        for _ in range(100):
            if follower.position == head:
                break
            await asyncio.sleep(0.05)
        await follower.stop()
        await ingestor.stop()
        seen = [r["position"] for r in store.query("SELECT position FROM seen ORDER BY rowid")]
        logged = [n.id for n in store.recorder.select_notifications(start=1, limit=100)]
        store.close()
        return seen, logged, flaky.appends

    seen, logged, appends = asyncio.run(scenario())
    assert appends > 2  # the refusal happened, and rounds came after it
    assert seen == logged
