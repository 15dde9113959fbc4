"""Floor for bench/hl7_ingest.py: a bare asyncio MLLP server, one SQLite row per message.

Group commit like Relais (a writer task drains a queue, one WAL + synchronous=FULL transaction
per batch on a worker thread, then a minimal AA ACK each); no parsing beyond MSH-10, no events.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
from datetime import UTC, datetime

Item = tuple[bytes, str, "asyncio.Future[None]"]


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS msgs (id INTEGER PRIMARY KEY, control_id TEXT NOT NULL, "
        "received_at TEXT NOT NULL, payload BLOB NOT NULL)"
    )
    return db


def commit(db: sqlite3.Connection, rows: list[tuple[str, str, bytes]]) -> None:
    db.execute("BEGIN")
    db.executemany("INSERT INTO msgs (control_id, received_at, payload) VALUES (?,?,?)", rows)
    db.execute("COMMIT")


async def writer(db: sqlite3.Connection, queue: asyncio.Queue[Item]) -> None:
    while True:
        items = [await queue.get()]
        while not queue.empty() and len(items) < 256:
            items.append(queue.get_nowait())
        now = datetime.now(UTC).isoformat()
        await asyncio.to_thread(commit, db, [(cid, now, raw) for raw, cid, _ in items])
        for _, _, fut in items:
            if not fut.done():
                fut.set_result(None)


async def serve(reader: asyncio.StreamReader, writer_: asyncio.StreamWriter, queue: asyncio.Queue[Item]) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            raw = await reader.readuntil(b"\x1c")
            raw = raw[raw.find(b"\x0b") + 1 : -1]
            msh = raw[: raw.find(b"\r")].split(b"|")
            cid = msh[9].decode() if len(msh) > 9 else ""
            fut: asyncio.Future[None] = loop.create_future()
            await queue.put((raw, cid, fut))
            await fut
            writer_.write(b"\x0bMSH|^~\\&|FLOOR||||||ACK|1|P|2.5\rMSA|AA|" + cid.encode() + b"\r\x1c\r")
            await writer_.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer_.close()


async def main(host: str, port: int, path: str) -> None:
    db = open_db(path)
    queue: asyncio.Queue[Item] = asyncio.Queue()
    task = asyncio.create_task(writer(db, queue))
    server = await asyncio.start_server(lambda r, w: serve(r, w, queue), host, port, limit=256 * 1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    task.cancel()
    db.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--db", required=True)
    args = ap.parse_args()
    asyncio.run(main(args.host, args.port, args.db))
