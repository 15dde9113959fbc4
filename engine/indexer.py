"""Keeps the message search index (patient identifiers) in step with the log, after the ACK.

Exactly once: the rows and the position commit together through the one writer.
"""

from __future__ import annotations

from engine.follower import LogFollower
from engine.ingest import Appendix
from read_models.message_search import INSERT_IDENTIFIER, identifier_rows

__all__ = ["SearchIndexer"]


class SearchIndexer(LogFollower):
    name = "message-search"
    min_interval = 0.2  # search may lag a moment; the ACK path should not pay for it
    idle_interval = 0.2  # past deliveries only: no new read after every commit of others

    def plan(self, after: int) -> tuple[Appendix, int]:
        notes, read_to = self.select(after, ["relais.MessageReceived"])
        if not notes:  # past routing and delivery events: moved on, nothing to record
            return Appendix(), read_to
        rows = identifier_rows((str(n.originator_id), self.store.decode(n).event) for n in notes)
        appendix = Appendix(statements=[(INSERT_IDENTIFIER, rows)] if rows else [])
        self.track(appendix, read_to)
        return appendix, read_to
