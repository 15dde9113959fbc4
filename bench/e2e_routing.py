"""End-to-end benchmark: MLLP in -> durable ACK -> router -> outbox -> MLLP out to a local
receiver that ACKs. Prints ingest msg/s, delivered msg/s and the lag from ACK to delivery.

    .venv/bin/python bench/e2e_routing.py [--connections 8] [--duration 10] [--out-connections 1]

With `--partner-down`, the receiver does not listen while the load runs: the outbox fills
(a partner down), then the receiver comes up and `drain/s` is how fast the backlog goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import commit_on_loop
from hl7_ingest import CLK_TCK, free_port, message_template, running

ROOT = Path(__file__).resolve().parent.parent
SB, EB = b"\x0b", b"\x1c\r"


def control_id_of(frame: bytes) -> bytes:
    return frame.split(b"\r", 1)[0].split(b"|")[9]


class WalWatch:
    """The largest size the store's WAL file reached, looked at four times a second."""

    def __init__(self, path: Path) -> None:
        self.path, self.largest = path, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            with contextlib.suppress(OSError):
                self.largest = max(self.largest, self.path.stat().st_size)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def receiver(port: int, pipe: Connection, ctl: Connection, drain: float, down: bool) -> None:
    """A partner that ACKs at once and notes when each control ID arrived. It stops once
    every control ID the load was ACKed for has come (then 0.5 s more, to see duplicates),
    or `drain` seconds after the load ended."""
    seen: dict[bytes, float] = {}
    frames = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        # Relais's connections are still open when the receiver stops: their tasks end
        # cancelled, quietly.
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while data := await reader.read(65536):
                buf += data
                while (end := buf.find(b"\x1c")) >= 0:
                    frame, buf = buf[buf.find(SB) + 1 : end], buf[end + 2 :]
                    cid = control_id_of(frame)
                    frames[0] += 1
                    seen.setdefault(cid, time.time())
                    ack = b"MSH|^~\\&|R|R|S|S|20261123||ACK^A01^ACK|1|P|2.5\rMSA|AA|" + cid + b"\r"
                    writer.write(SB + ack + EB)

    async def main() -> None:
        if down:  # a partner down: nothing listens until told to come up
            while not ctl.poll():
                await asyncio.sleep(0.05)
            ctl.recv()
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        async with server:
            while not ctl.poll():
                await asyncio.sleep(0.05)
            expected: set[bytes] = ctl.recv()
            deadline = time.monotonic() + drain
            while time.monotonic() < deadline and not expected <= seen.keys():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)

    asyncio.run(main())
    pipe.send((seen, frames[0], time.process_time()))


def load(port: int, n_conn: int, duration: float, pipe: Connection) -> None:
    """N connections, each sends a message and waits for its ACK; notes each ACK time."""
    head, tail = message_template()
    acked: dict[bytes, float] = {}
    patient = b"123456^^^CHU_EXEMPLE"  # varied below: order is kept per patient, patients go in parallel

    async def one(conn_no: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        deadline = time.monotonic() + duration
        i = 0
        while time.monotonic() < deadline:
            cid = f"E2E{conn_no:03d}{i:09d}".encode()
            ipp = f"{(conn_no * 7919 + i) % 5000:06d}^^^CHU_EXEMPLE".encode()
            writer.write(SB + head + cid + tail.replace(patient, ipp) + EB)
            data = await reader.readuntil(b"\x1c\r")
            if b"MSA|AA|" + cid in data:
                acked[cid] = time.time()
            i += 1
        writer.close()

    async def main() -> None:
        await asyncio.gather(*(one(c) for c in range(n_conn)))

    # How idle the machine was while the load ran (not during this process's start or the
    # drain after it).
    idle0, all0 = machine_ticks()
    asyncio.run(main())
    idle1, all1 = machine_ticks()
    pipe.send((acked, time.process_time(), 100 * (idle1 - idle0) / max(1, all1 - all0)))


def process_ticks(pid: int) -> dict[str, int]:
    """CPU ticks (user + system) of a process and of each of its children, by the name each
    shows in ps (relais-router, relais-writer, relais-acceptN...)."""
    pids = {pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.add(int(entry.name))
    ticks: dict[str, int] = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            name = "engine" if p == pid else Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(idle, all) CPU ticks of the whole machine so far, every CPU (/proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def peak_memory(pid: int) -> dict[str, int]:
    """The largest resident size (VmHWM, kB) of a process and of each of its children."""
    peaks: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name != str(pid) and int(stat[1]) != pid:
                continue
            name = "engine" if entry.name == str(pid) else (entry / "comm").read_text().strip()
            hwm = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
        peaks[name] = max(peaks.get(name, 0), int(hwm.split()[1]))
    return peaks


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1] if len(values) > 1 else (values[0] if values else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--drain", type=float, default=60.0, help="max seconds to wait for the outbox to empty")
    ap.add_argument("--out-connections", type=int, default=1, help="the MLLP destination's parallel connections")
    ap.add_argument("--acceptors", type=int, default=0, help="[ingest] acceptors (processes parsing HL7)")
    ap.add_argument("--router-process", choices=["on", "off"], help="[routing] process (default: the engine's)")
    ap.add_argument("--writer-process", action="store_true", help="[ingest] writer_process = true")
    ap.add_argument("--commit-on-loop", choices=["on", "off"], help="[ingest] commit_on_loop (default: the engine's)")
    ap.add_argument("--delivery-concurrency", type=int, help="[routing] delivery_concurrency (default 32)")
    ap.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning"],
        help="[log] level (default warning; config.toml's default is info: one line per message and per delivery)",
    )  # fmt: skip
    ap.add_argument("--partner-down", action="store_true", help="the receiver comes up once the load has ended")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as d:
        tmp = Path(d)
        relais_port, partner_port = free_port(), free_port()
        (tmp / "routes").mkdir()
        (tmp / "routes" / "partner.toml").write_text(
            '[filter]\nmessage_type = "ADT"\n[[transform]]\nset = "MSH-5"\nvalue = "PARTNER"\n'
            '[[destination]]\nname = "partner"\ntype = "mllp"\nordering_key = "sender+patient"\n'
            # A partner back up is tried again within a second (the default backoff grows to
            # minutes): the drain then measures the engine, not the backoff.
            + ("backoff_initial = 0.5\nbackoff_max = 1.0\nmax_attempts = 1000\n" if args.partner_down else "")
            + f'[destination.settings]\nhost = "127.0.0.1"\nport = {partner_port}\n'
            f"connections = {args.out_connections}\n"
        )
        (tmp / "config.toml").write_text(
            f'[store]\nurl = "sqlite:///data/relais.db"\nblob_dir = "data/blobs"\n[log]\nlevel = "{args.log_level}"\n'
            f"[ingest]\nacceptors = {args.acceptors}\n"
            + ("writer_process = true\n" if args.writer_process else "")
            + commit_on_loop(args)
            + "[routing]\n"
            + (f"process = {'true' if args.router_process == 'on' else 'false'}\n" if args.router_process else "")
            + (f"delivery_concurrency = {args.delivery_concurrency}\n" if args.delivery_concurrency else "")
            + f'[[listeners.mllp]]\nname = "mllp"\nport = {relais_port}\n'
            # Room for every load connection and the readiness probe's (default limit: 64).
            + f"max_connections = {max(64, args.connections + 8)}\n"
        )
        ctx = mp.get_context("spawn")
        recv_pipe, recv_child = ctx.Pipe(duplex=False)
        ctl_child, ctl = ctx.Pipe(duplex=False)
        rproc = ctx.Process(target=receiver, args=(partner_port, recv_child, ctl_child, args.drain, args.partner_down),
                            daemon=True)  # fmt: skip
        rproc.start()
        cmd = [str(ROOT / ".venv" / "bin" / "relais"), "--config", str(tmp / "config.toml"), "run"]
        with running(cmd, relais_port, tmp / "server.log") as server:
            time.sleep(0.5 * args.acceptors)  # acceptor processes start after the port answers
            load_pipe, load_child = ctx.Pipe(duplex=False)
            lproc = ctx.Process(target=load, args=(relais_port, args.connections, args.duration, load_child))
            ticks0 = process_ticks(server.pid)
            wal = WalWatch(tmp / "data" / "relais.db-wal")
            start = time.time()
            lproc.start()
            if not load_pipe.poll(args.duration + 60):  # e.g. a connection over the listener's limit (64)
                raise SystemExit("the load generator gave no result (a connection failed?)")
            acked, load_cpu, idle = load_pipe.recv()
            lproc.join()
            up = time.time()
            if args.partner_down:
                ctl.send("up")
            ctl.send(set(acked))
            delivered, frames, partner_cpu = recv_pipe.recv()
            ticks1 = process_ticks(server.pid)
            peaks = peak_memory(server.pid)
            elapsed = time.time() - start
            wal.stop()
            rproc.join(10)
    lags = [(delivered[c] - t) * 1000 for c, t in acked.items() if c in delivered]
    last = max(delivered.values(), default=start)
    # Both rates count from the first ACK: ingest/s to the last ACK, deliv/s to the last
    # delivery. Until §25 ingest/s divided by --duration (each connection counts it from its
    # own start: read high) and deliv/s counted from the start of the load's process (read
    # low by its ~0.5 s start-up).
    first = min(acked.values(), default=start)
    intake = len(acked) / max(1e-9, max(acked.values(), default=first) - first)
    per_process = {name: (t - ticks0.get(name, 0)) / CLK_TCK for name, t in ticks1.items()}
    cpu_ms = 1000 * sum(per_process.values()) / max(1, len(lags))
    # Where the CPU went: a process near 100 % of one core is the limit.
    busy = ", ".join(f"{name} {100 * s / elapsed:.0f} %" for name, s in sorted(per_process.items(), key=lambda i: -i[1])
                     if s / elapsed >= 0.01)  # fmt: skip
    if args.partner_down:
        drained = sum(1 for c in acked if c in delivered)
        print(f"# partner down during the load: {len(acked)} messages waiting when it came up")
        print(f"{'backlog':>8} {'drained':>8} {'drain s':>8} {'drain/s':>8} {'lost':>5} {'twice':>5}")
        print(f"{len(acked):>8} {drained:>8} {last - up:>8.1f} {drained / max(1e-9, last - up):>8.0f} "
              f"{len(acked) - drained:>5} {frames - len(delivered):>5}")  # fmt: skip
        return 0 if drained == len(acked) else 1
    print(
        f"# e2e: {args.connections} connections for {args.duration:.0f} s, SQLite WAL+FULL, 1 channel -> MLLP "
        f"({args.out_connections} outbound connection(s)), log level {args.log_level}"
    )
    print(f"{'acked':>8} {'ingest/s':>9} {'delivered':>10} {'deliv/s':>8} {'lag p50 ms':>11} {'lag p99 ms':>11}"
          f" {'lag max ms':>11} {'lost':>5} {'twice':>5} {'cpu ms/msg':>10}")  # fmt: skip
    print(
        f"{len(acked):>8} {intake:>9.0f} {len(lags):>10} {len(lags) / max(1e-9, last - first):>8.0f} "
        f"{pct(lags, 50):>11.1f} {pct(lags, 99):>11.1f} {max(lags, default=0):>11.1f} "
        f"{len(acked) - len(lags):>5} {frames - len(delivered):>5} {cpu_ms:>10.2f}"
    )
    print(f"# cpu, share of one core from the first message to the last delivery: {busy}")
    # The rest of the machine: what the bench's own processes took, and what no one used
    # while the load ran. Idle near 0 means the machine, not one process, is the limit.
    print(
        f"# bench processes: load {100 * load_cpu / elapsed:.0f} %, partner {100 * partner_cpu / elapsed:.0f} %"
        f" of a core; machine idle during the load {idle:.0f} % of its {os.cpu_count()} CPUs"
    )
    print("# peak memory (VmHWM): " + ", ".join(f"{name} {kb / 1024:.0f} MB" for name, kb in sorted(peaks.items())))
    print(
        f"# SQLite WAL file: largest {wal.largest / 1e6:.0f} MB (§26: without checkpoints that let it start over, "
        "it grew with every commit)"
    )
    return 0 if len(lags) == len(acked) else 1


if __name__ == "__main__":
    sys.exit(main())
