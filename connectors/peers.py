"""Peer allow-lists of the listeners: the config's CIDRs, and whether a connecting address is in one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["PeerAllowList"]


class PeerAllowList:
    """An empty list allows every peer; an address that cannot be read is refused."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: object) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0])  # an IPv6 zone is not part of it
        except ValueError:
            return False
        return any(ip in net for net in self.networks)
