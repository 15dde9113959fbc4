"""Followers of the log stop cleanly: the engine may close the store right after."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from engine.follower import LogFollower
from engine.ingest import Appendix, Ingestor
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
