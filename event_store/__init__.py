"""Relais's append-only event store: event types, payloads, hash chain, message index.

Imports nothing of the rest of Relais; the engine, read models and replay build on it.
"""

from event_store.blobs import BlobStore, sha256_hex
from event_store.events import (
    DuplicateReceived,
    EncodedEvent,
    Event,
    MessageReceived,
    MessageRejected,
    PayloadRef,
)
from event_store.store import Batch, ChainReport, EventStore, MessageIndexRow, RecordedEvent

__all__ = [
    "Batch",
    "BlobStore",
    "ChainReport",
    "DuplicateReceived",
    "EncodedEvent",
    "Event",
    "EventStore",
    "MessageIndexRow",
    "MessageReceived",
    "MessageRejected",
    "PayloadRef",
    "RecordedEvent",
    "sha256_hex",
]
