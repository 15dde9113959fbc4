"""The patient-identifier search index of `relais messages list --patient`.

Filled from `MessageReceived` events after the ACK (not in the ACK's transaction: each
identifier row is a random page of its index, and the ACK path should not pay for a
search). Pure: it turns events into rows; the engine commits them with its position.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["INSERT_IDENTIFIER", "identifier_rows"]

INSERT_IDENTIFIER = "INSERT INTO relais_identifiers VALUES (?,?,?,?)"


def identifier_rows(received: Iterable[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, str, str]]:
    """(message id, value, type, authority) for every patient identifier of each message,
    from its `MessageReceived` event (PID-3 and MRG-1 as read at the edge)."""
    rows = []
    for message_id, event in received:
        meta = event.get("metadata", {})
        for ident in (*meta.get("patient_identifiers", ()), *meta.get("merged_identifiers", ())):
            rows.append((message_id, ident["id"], ident.get("type", ""),
                         ident.get("authority_oid") or ident.get("authority", "")))  # fmt: skip
    return rows
