"""A channel's destinations as the delivery workers use them, built in the process that
delivers (the engine, or the router process: engine/router_process.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from connectors.destination import Destination
from engine.ingest import Appender
from engine.routes import Channel, DestinationSpec
from event_store import EventStore

__all__ = ["Target", "build_targets", "close_targets"]


@dataclass(frozen=True)
class Target:
    """A configured destination of a channel and how to treat its failures."""

    spec: DestinationSpec
    destination: Destination


def build_targets(channels: list[Channel], store: EventStore, writer: Appender) -> dict[tuple[str, str], Target]:
    """The destinations of the channels, per (channel, destination), ready to deliver in
    the process that owns `store` and `writer` (the engine, or the router process)."""
    from connectors.registry import build_destination
    from engine.identity_feed import IdentityDestination

    targets = {
        (channel.name, spec.name): Target(spec, build_destination(spec.name, spec.type, spec.settings,
                                                                  channel.path.parent))
        for channel in channels
        for spec in channel.destinations
    }  # fmt: skip
    for target in targets.values():
        if isinstance(target.destination, IdentityDestination):  # writes a read model
            target.destination.bind(store, writer)
        if hasattr(target.destination, "payload_loader"):  # DICOM: a study's instances
            target.destination.payload_loader = store.payload
    return targets


async def close_targets(targets: Mapping[tuple[str, str], Target]) -> None:
    for target in targets.values():
        await target.destination.close()
