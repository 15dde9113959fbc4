"""HL7 v2 / MLLP ingest benchmark: durable msg/s and ACK latency of Relais vs a bare floor server.

Each server runs as its own process; the load comes from other processes (asyncio, raw MLLP).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from harness import free_port, running

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SB, EB, CR = b"\x0b", b"\x1c", b"\r"


# -- messages -----------------------------------------------------------------------------


def message_template() -> tuple[bytes, bytes]:
    """An IHE PAM France ADT^A01 of ~1.5 KB, split around MSH-10 (prefix, suffix)."""
    msh_head = "MSH|^~\\&|SIH_CHU|CHU_EXEMPLE|RELAIS|GRADES|20261123101500||ADT^A01^ADT_A01|"
    msh_tail = "|P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|||2.11^IHE_FRANCE-2.11-PAM"
    ids = (
        "123456^^^CHU_EXEMPLE&1.2.250.1.71.4.2.2&ISO^PI"
        "~260058815400233^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    )
    pid = ["PID", "1", "", ids, "", "MARTIN^Claire^^^^^L~DUPONT^Claire^^^^^D", "", "19850615", "F"]
    pid += ["", "", "12 RUE DES LILAS^^LYON^^69003^FRA^H", "", "^PRN^PH^^^^^^^^^0472000000"]
    pid += [""] * (32 - len(pid)) + ["VALI"]
    segments = [
        "EVN||20261123101500|||DR^MEDECIN^JEAN|20261123101000|CHU_EXEMPLE",
        "|".join(pid),
        "PD1||||1234567890^GENERALISTE^PAUL^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS",
        "NK1|1|DUPONT^Jean^^^^^L|SPO^Spouse^HL70063|12 RUE DES LILAS^^LYON^^69003^FRA^H|^PRN^PH^^^^^^^^^0601020304",
        "NK1|2|MARTIN^Louise^^^^^L|MTH^Mother^HL70063||^PRN^PH^^^^^^^^^0611223344||C^Contact^HL70131",
        "PV1|1|I|CARDIO^101^1^CHU_EXEMPLE||||1234567890^CARDIO^ANNE^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"
        "^D^^^RPPS||||||||||||V20261123001^^^CHU_EXEMPLE&1.2.250.1.71.4.2.2&ISO^VN|||||||||||||||||||||||||"
        "20261123101000",
        "PV2|||CARDIO^Insuffisance cardiaque^LOCAL||||||20261130|7",
        "ZBE|MVT20261123001^CHU_EXEMPLE^1.2.250.1.71.4.2.2^ISO|20261123101000||INSERT|N||CARDIO^^^^^^UF^^^4401|||HMS",
        "ZFA|CR|20261101||||N|N",
        "ZFP|1|23",
        "ZFV|750712184^20261123^^^|||||",
        "ZFM|8|||",
        "OBX|1|NM|3141-9^Poids^LN||72|kg^kg^UCUM|||||F|||20261123100000",
        "OBX|2|NM|8302-2^Taille^LN||168|cm^cm^UCUM|||||F|||20261123100000",
        "OBX|3|ST|ALLERG^Allergies connues^LOCAL||Penicilline (urticaire)||||||F|||20261123100000",
        "AL1|1|DA|PENI^Penicilline^LOCAL|MO|Urticaire|20100101",
        "IN1|1|CPAM^Regime general^LOCAL|691^CPAM DU RHONE|CPAM DU RHONE^^LYON^^69000^FRA||||||||"
        "|20260101|20261231||||||||||||||||||||||||260058815400233",
    ]
    prefix = (msh_head).encode()
    suffix = (msh_tail + "\r" + "\r".join(segments) + "\r").encode()
    return prefix, suffix


# -- load generator (runs in worker processes) -------------------------------------------


@dataclass
class WorkerResult:
    acked: int = 0  # in the measured window
    total: int = 0  # every ACK received (warm-up included)
    errors: list[str] = field(default_factory=list)
    latencies: bytes = b""  # array('d') of seconds, measured window only
    cpu: float = 0.0  # worker process CPU seconds during the measured window
    first_send: float = 0.0
    last_ack: float = 0.0


class MllpClient(asyncio.Protocol):
    """One connection: send a message, wait for its ACK, check it, send the next."""

    def __init__(self, tag: str, state: _Run) -> None:
        self.tag, self.state = tag, state
        self.buf = bytearray()
        self.seq = 0
        self.cid = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        st = self.state
        if st.budget <= 0 or (st.stop_at and time.monotonic() >= st.stop_at):
            if not self.done.done():
                self.done.set_result(None)
            return
        st.budget -= 1
        self.seq += 1
        self.cid = f"{self.tag}{self.seq:09d}".encode()
        self.sent_at = time.monotonic()
        assert self.transport is not None
        self.transport.write(SB + st.prefix + self.cid + st.suffix + EB + CR)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(EB)
        if end < 0:
            return
        now = time.monotonic()
        start = self.buf.find(SB)
        ack = bytes(self.buf[start + 1 : end])
        del self.buf[: end + 1]
        st = self.state
        st.result.total += 1
        msa = next((s for s in ack.split(CR) if s.startswith(b"MSA")), b"").split(b"|")
        if len(msa) < 3 or msa[1] != b"AA" or msa[2] != self.cid:
            if len(st.result.errors) < 5:
                st.result.errors.append(f"bad ACK for {self.cid!r}: {ack[:200]!r}")
            st.bad += 1
        elif now >= st.window_start and (not st.stop_at or now <= st.stop_at):
            st.result.acked += 1
            st.lat.append(now - self.sent_at)
            st.result.first_send = st.result.first_send or self.sent_at
            st.result.last_ack = now
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed by server: {exc}"))


@dataclass
class _Run:
    prefix: bytes
    suffix: bytes
    budget: int
    window_start: float = 0.0
    stop_at: float = 0.0
    bad: int = 0
    cpu0: float = 0.0
    lat: array[float] = field(default_factory=lambda: array("d"))
    result: WorkerResult = field(default_factory=WorkerResult)


async def _drive(port: int, n_conn: int, wid: int, budget: int, pipe: Connection) -> WorkerResult:
    loop = asyncio.get_running_loop()
    prefix, suffix = message_template()
    state = _Run(prefix, suffix, budget)
    clients = []
    for i in range(n_conn):
        client = MllpClient(f"B{wid:02d}{i:03d}", state)
        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
        clients.append(client)
    pipe.send("ready")
    t0, warmup, duration = await loop.run_in_executor(None, pipe.recv)
    state.window_start = t0 + warmup
    state.stop_at = t0 + warmup + duration if duration else 0.0
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    cpu_mark = loop.call_at(
        loop.time() + max(0.0, state.window_start - time.monotonic()),
        lambda: setattr(state, "cpu0", time.process_time()),
    )
    for c in clients:
        c.send_next()
    try:
        await asyncio.gather(*(c.done for c in clients))
    finally:
        cpu_mark.cancel()
        for c in clients:
            if c.transport is not None:
                c.transport.close()
    res = state.result
    res.cpu = time.process_time() - state.cpu0
    res.latencies = state.lat.tobytes()
    return res


def worker(port: int, n_conn: int, wid: int, budget: int, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        pipe.send(asyncio.run(_drive(port, n_conn, wid, budget, pipe)))
    except Exception as e:
        pipe.send(f"worker {wid} failed: {type(e).__name__}: {e}")


# -- servers under test ----------------------------------------------------------------


ACCEPTORS = 0  # set from --acceptors


def relais_server(tmp: Path, port: int, window_ms: float) -> tuple[list[str], Path, str]:
    (tmp / "config.toml").write_text(
        f"""[store]
url = "sqlite:///data/relais.db"
blob_dir = "data/blobs"

[ingest]
batch_window_ms = {window_ms}
acceptors = {ACCEPTORS}

[routing]
enabled = false

[log]
level = "warning"

[[listeners.mllp]]
name = "bench"
host = "127.0.0.1"
port = {port}
""",
        encoding="utf-8",
    )
    cmd = [str(BIN / "relais"), "--config", str(tmp / "config.toml"), "run"]
    return cmd, tmp / "data" / "relais.db", "SELECT count(*) FROM relais_messages"


def floor_server(tmp: Path, port: int, _: float) -> tuple[list[str], Path, str]:
    db = tmp / "floor.db"
    cmd = [sys.executable, str(ROOT / "bench" / "floor_server.py"), "--port", str(port), "--db", str(db)]
    return cmd, db, "SELECT count(*) FROM msgs"


def thread_ticks(pid: int) -> tuple[int, int]:
    """(CPU ticks of the main thread, of all other threads) of a process."""
    main = other = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if int(tid) == pid:
            main += ticks
        else:
            other += ticks
    return main, other


@dataclass
class Row:
    server: str
    conns: int
    acked: int
    seconds: float
    p50: float
    p99: float
    pmax: float
    server_cpu: float
    loop_cpu: float
    gen_cpu: float
    stored: int
    total: int
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0


def run_one(name: str, n_conn: int, args: argparse.Namespace) -> Row:
    make = relais_server if name == "relais" else floor_server
    procs = args.procs or (1 if n_conn == 1 else 2)
    procs = min(procs, n_conn)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
        tmp = Path(d)
        port = free_port()
        cmd, db, count_sql = make(tmp, port, args.batch_window_ms)
        workers: list[tuple[mp.Process, Connection]] = []
        try:
            with running(cmd, port, tmp / "server.log") as server:
                budget_total = args.messages or 10**12
                for w in range(procs):
                    n = n_conn // procs + (1 if w < n_conn % procs else 0)
                    parent, child = mp.Pipe()
                    budget = budget_total // procs + (1 if w < budget_total % procs else 0)
                    p = mp.Process(target=worker, args=(port, n, w, budget, child), daemon=True)
                    p.start()
                    workers.append((p, parent))
                for _, pipe in workers:
                    msg = pipe.recv() if pipe.poll(30) else "no answer in 30 s"
                    if msg != "ready":
                        raise RuntimeError(f"load worker not ready: {msg}")
                warmup = 0.0 if args.messages else args.warmup
                duration = 0.0 if args.messages else args.duration
                t0 = time.monotonic() + 0.1
                for _, pipe in workers:
                    pipe.send((t0, warmup, duration))
                time.sleep(max(0.0, t0 + warmup - time.monotonic()))
                m0, o0 = thread_ticks(server.pid)
                c0 = time.monotonic()
                results: list[WorkerResult] = []
                for _, pipe in workers:
                    if not pipe.poll(args.duration + args.warmup + 600):
                        raise RuntimeError("load worker timed out")
                    r = pipe.recv()
                    if isinstance(r, str):
                        raise RuntimeError(r)
                    results.append(r)
                m1, o1 = thread_ticks(server.pid)
                elapsed_cpu = time.monotonic() - c0
        finally:
            for p, _ in workers:
                p.join(5)
                if p.is_alive():
                    p.kill()
        with sqlite3.connect(db) as conn:
            stored = int(conn.execute(count_sql).fetchone()[0])
    lat = sorted(x for r in results for x in array("d", r.latencies))
    acked = sum(r.acked for r in results)
    if args.messages:
        seconds = max(r.last_ack for r in results) - min(r.first_send for r in results if r.first_send)
    else:
        seconds = args.duration
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    return Row(
        server=name,
        conns=n_conn,
        acked=acked,
        seconds=seconds,
        p50=q[49] * 1e3,
        p99=q[98] * 1e3,
        pmax=(lat[-1] if lat else 0.0) * 1e3,
        server_cpu=100 * (m1 + o1 - m0 - o0) / CLK_TCK / elapsed_cpu,
        loop_cpu=100 * (m1 - m0) / CLK_TCK / elapsed_cpu,
        gen_cpu=100 * sum(r.cpu for r in results) / seconds if seconds else 0.0,
        stored=stored,
        total=sum(r.total for r in results),
        errors=[e for r in results for e in r.errors],
    )


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'server':<7} {'conns':>5} {'msg/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'srv CPU%':>8} {'loop%':>6} {'gen CPU%':>8} {'acked':>7} {'stored':>7} {'ok':>3}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = "yes" if not r.errors and r.stored == r.total else "NO"
        print(
            f"{r.server:<7} {r.conns:>5} {r.rate:>8.0f} {r.p50:>7.2f} {r.p99:>7.2f} {r.pmax:>7.1f} "
            f"{r.server_cpu:>8.0f} {r.loop_cpu:>6.0f} {r.gen_cpu:>8.0f} {r.total:>7} {r.stored:>7} {ok:>3}"
        )
    for r in rows:
        for e in r.errors:
            print(f"  {r.server}/{r.conns}: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first (default 1.5)")
    ap.add_argument("--messages", type=int, default=0, help="send exactly this many per run instead")
    ap.add_argument("--procs", type=int, default=0, help="load processes (default: 1 for 1 conn, else 2)")
    ap.add_argument("--server", choices=["relais", "floor", "both"], default="both")
    ap.add_argument("--batch-window-ms", type=float, default=0.0, help="Relais [ingest] (default 0.0)")
    ap.add_argument("--acceptors", type=int, default=0, help="Relais [ingest] acceptor processes (default 0)")
    args = ap.parse_args()
    global ACCEPTORS
    ACCEPTORS = args.acceptors
    names = ["relais", "floor"] if args.server == "both" else [args.server]
    load = f"{args.messages} messages/run" if args.messages else f"{args.warmup}s warm-up + {args.duration}s"
    print(
        f"# {len(os.sched_getaffinity(0))} CPUs, ~1.5 KB ADT^A01, SQLite WAL + synchronous=FULL, "
        f"Relais batch_window_ms={args.batch_window_ms}, acceptors={args.acceptors}; {load}",
        flush=True,
    )
    rows = []
    for name in names:
        for n in args.connections:
            rows.append(run_one(name, n, args))
            r = rows[-1]
            print(f"  {name:<6} {n:>3} conns: {r.rate:8.0f} msg/s  p50 {r.p50:.2f} ms  p99 {r.p99:.2f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
    print_table(rows)
    return 0 if all(not r.errors and r.stored == r.total for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
