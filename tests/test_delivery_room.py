"""Deliveries whose outcome waits for its commit hold no slot: a writer slow to commit does
not stop the attempts to a partner that answers (bench/RESULTS.md §27)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from hl7.client import MLLPClient

from tests.conftest import adt, wait_for
from tests.test_routing import channel_file, topics


class HeldPartner:
    """An MLLP receiver on its own thread that notes each control ID it is sent and answers
    AA, but only once released."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        self._ready.wait(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.readuntil(b"\x1c\r"):
                control_id = data.split(b"\r", 1)[0].split(b"|")[9].decode()
                self.received.append(control_id)
                await self._released.wait()
                ack = f"MSH|^~\\&|P|P|R|R|20261124||ACK|{control_id}|P|2.5\rMSA|AA|{control_id}\r"
                writer.write(b"\x0b" + ack.encode() + b"\x1c\r")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._released, self._stop = asyncio.Event(), asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # asyncio.run then cancels the connections' tasks, which close their sockets.

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._released.set)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


def test_attempts_go_on_while_their_outcomes_wait_for_a_slow_commit(relais, tmp_path: Path) -> None:
    partner = HeldPartner()
    try:
        channel_file(tmp_path / "routes", partner.port)
        # One slot: up to 4 attempts speaking or waiting for it, up to 16 in all with those
        # whose outcome waits for its commit. The store's lock is waited for, not given up on.
        hub = relais(
            store={"url": "sqlite:///relais.db", "blob_dir": "blobs", "lock_timeout": 60},
            routing={"enabled": True, "routes_dir": str(tmp_path / "routes"), "delivery_concurrency": 1},
        )
        ids = [f"ROOM-{p}" for p in range(30)]
        with MLLPClient("127.0.0.1", hub.port) as client:
            for p, control_id in enumerate(ids):
                assert b"MSA|AA|" in client.send_message(adt("A08", control_id=control_id, ipp=f"RM{p:03d}", ins=None))
        wait_for(lambda: all("MessageRouted" in topics(hub, c) for c in ids), what="every message routed")
        wait_for(lambda: partner.received, what="a first attempt, held by the partner")
        # Another connection holds the database's write lock: nothing commits until it ends.
        lock = sqlite3.connect(hub.config.base_dir / "relais.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            partner.release()
            # Each answered attempt's outcome waits for the lock; the next attempts still go.
            wait_for(lambda: len(set(partner.received)) >= 12, timeout=20, what="attempts while commits wait")
            time.sleep(0.5)
            assert len(set(partner.received)) <= 16  # the bound on attempts waiting for their commit
            assert not any("Delivered" in topics(hub, c) for c in ids)  # none committed meanwhile
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        wait_for(lambda: all("Delivered" in topics(hub, c) for c in ids), what="every delivery recorded")
        assert sorted(set(partner.received)) == sorted(ids)
        for control_id in ids:
            assert topics(hub, control_id).count("Delivered") == 1
    finally:
        partner.stop()
