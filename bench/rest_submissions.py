"""REST submissions benchmark: durable submissions/s and latency of `POST /v1/submissions`.

Relais runs as its own process (`relais run`, SQLite store, routing off); the load comes from
another process: N concurrent httpx clients, each submission a ~10 KB document in base64 with
its own Idempotency-Key. Prints one row per concurrency level; checks the store's count.

    .venv/bin/python bench/rest_submissions.py [--concurrency 1 8 32] [--duration 5] [--multipart]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import commit_on_loop, relais_config
from hl7_ingest import BIN, free_port, running

TOKEN = "bench-token-" + uuid.uuid4().hex
DOCUMENT = (b"%PDF-1.4\n" + os.urandom(7_500))[:7_500]  # ~10 KB once base64-encoded


def submission(multipart: bool) -> dict[str, object]:
    doc: dict[str, object] = {"filename": "cr.pdf", "content_type": "application/pdf", "type_code": "11502-2"}
    if multipart:
        doc["part"] = "file0"
    else:
        doc["content"] = base64.b64encode(DOCUMENT).decode()
    return {
        "kind": "document",
        "patient": {"ins": "260058815400233", "local_id": "123456"},
        "author": {"rpps": "10001234567"},
        "author_institution": "690000001",
        "documents": [doc],
    }


def write_config(tmp: Path, port: int, ingest: str = "") -> Path:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    path = tmp / "config.toml"
    listener = f"""[[listeners.http]]
name = "bench"
host = "127.0.0.1"
port = {port}

[[listeners.http.tokens]]
name = "bench"
sha256 = "{digest}"
roles = ["sender"]
"""
    path.write_text(relais_config(listener, sections=f"[ingest]\n{ingest}"), encoding="utf-8")
    return path


async def _load(url: str, concurrency: int, duration: float, multipart: bool) -> tuple[int, int, list[float]]:
    body = submission(multipart)
    meta = json.dumps(body)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        stop_at = time.perf_counter() + duration

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                headers = {"Idempotency-Key": uuid.uuid4().hex}
                started = time.perf_counter()
                if multipart:
                    files = {
                        "metadata": (None, meta, "application/json"),
                        "file0": ("cr.pdf", DOCUMENT, "application/pdf"),
                    }
                    r = await client.post("/v1/submissions", files=files, headers=headers)
                else:
                    r = await client.post("/v1/submissions", json=body, headers=headers)
                if r.status_code == 202:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return len(latencies), errors, latencies


def _client_process(url: str, concurrency: int, duration: float, multipart: bool, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_load(url, concurrency, duration, multipart)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--processes", type=int, default=4, help="client processes at most (one per 8 clients)")
    ap.add_argument("--multipart", action="store_true", help="documents as multipart parts, not base64 JSON")
    ap.add_argument("--commit-on-loop", choices=["on", "off"], help="[ingest] commit_on_loop (default: the engine's)")
    args = ap.parse_args()
    rows = []
    for n in args.concurrency:
        with tempfile.TemporaryDirectory(prefix="relais-rest-bench-") as folder:
            tmp = Path(folder)
            port = free_port()
            config = write_config(tmp, port, commit_on_loop(args))
            cmd = [str(BIN / "relais"), "--config", str(config), "run"]
            with running(cmd, port, tmp / "server.log"):
                # httpx's pool slows down past ~8 connections: spread the clients over processes.
                procs = max(1, min(args.processes, n // 8))
                queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
                workers = [
                    mp.Process(
                        target=_client_process,
                        args=(f"http://127.0.0.1:{port}", n // procs + (k < n % procs), args.duration, args.multipart,
                              queue),
                    )
                    for k in range(procs)
                ]  # fmt: skip
                for w in workers:
                    w.start()
                ok, errors, latencies = 0, 0, []
                for _ in workers:
                    part_ok, part_errors, part_latencies = queue.get()
                    ok, errors = ok + part_ok, errors + part_errors
                    latencies += part_latencies
                for w in workers:
                    w.join()
            with sqlite3.connect(tmp / "data" / "relais.db") as db:
                stored = db.execute("SELECT count(*) FROM relais_messages WHERE status = 'accepted'").fetchone()[0]
            latencies.sort()
            p50 = statistics.median(latencies) * 1000 if latencies else 0.0
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0
            rows.append((n, procs, ok, errors, stored, ok / args.duration, p50, p99))
    kind = "multipart" if args.multipart else "base64 JSON"
    print(f"REST submissions ({kind}, ~10 KB document each), {args.duration:g} s per level")
    head = ("clients", "procs", "accepted", "errors", "stored", "subm/s", "p50 ms", "p99 ms")
    print("{:>7} {:>5} {:>9} {:>6} {:>7} {:>8} {:>7} {:>7}".format(*head))
    for n, procs, ok, errors, stored, rate, p50, p99 in rows:
        print(f"{n:>7} {procs:>5} {ok:>9} {errors:>6} {stored:>7} {rate:>8.0f} {p50:>7.1f} {p99:>7.1f}")
    return 0 if all(r[4] >= r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
