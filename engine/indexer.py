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

    def plan(self, after: int) -> tuple[Appendix, int]:
        notes = self.store.recorder.select_notifications(
            start=after + 1, limit=self.batch_size, topics=["relais.MessageReceived"]
        )
        if not notes:
            return Appendix(), after
        rows = identifier_rows((str(n.originator_id), self.store.decode(n).event) for n in notes)
        appendix = Appendix(statements=[(INSERT_IDENTIFIER, rows)] if rows else [])
        self.track(appendix, notes[-1].id)
        return appendix, notes[-1].id
