"""MSSanté / SMTP ingest benchmark: durable mails/s with a 100 KB IHE_XDM.ZIP attachment.

Relais runs as its own process (`relais run`, SQLite, one SMTP listener); the load comes
from client processes, each one smtplib session (STARTTLS + AUTH PLAIN once, then
MAIL/RCPT/DATA in a loop). Every 250 counted is a mail committed with its
MailReceived and DocumentSubmitted events.

    .venv/bin/python bench/mail_ingest.py --sessions 1 4 8 --duration 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from harness import commit_on_loop, free_port, relais_config, wait_listening

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.smtp import hash_password  # noqa: E402
from tests.mail_samples import Doc, Mail, cda, xdm_zip  # noqa: E402

USER, PASSWORD = "bench@hopital.mssante.fr", "bench password"
PLACEHOLDER = b"BENCHMSGID000000"


def bench_mail(attachment_kb: int) -> bytes:
    """A mail whose IHE_XDM.ZIP is ~attachment_kb KB (an incompressible PDF inside)."""
    pdf = b"%PDF-1.4\n" + os.urandom(attachment_kb * 1024)
    archive = xdm_zip([Doc(data=cda()), Doc(filename="DOC0002.PDF", mime_type="application/pdf", data=pdf)])
    msg = Mail(xdm=archive, headers={"X-MSS-INS": "O"}).build()
    del msg["Message-ID"]
    msg["Message-ID"] = f"<{PLACEHOLDER.decode()}@bench.example>"
    import email.policy

    return msg.as_bytes(policy=email.policy.SMTP)


def n_measured_share(latencies: list[float], sent: int) -> float:
    """The share of this client's CPU spent on measured mails (the rest: warm-up, TLS, login)."""
    return len(latencies) / max(sent, 1)


def client(
    port: int, wid: int, raw: bytes, start_at: float, stop_at: float, pipe: Connection, nodelay: bool = False
) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    latencies: list[float] = []
    refused = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        if nodelay:  # smtplib leaves Nagle on (the server answers with TCP_QUICKACK for that)
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.starttls(context=ctx)
        smtp.login(USER, PASSWORD)
        n = 0
        while time.time() < stop_at:
            n += 1
            mail = raw.replace(PLACEHOLDER, f"W{wid:03d}N{n:011d}".encode())
            t0 = time.perf_counter()
            smtp.mail("dr.martin@hopital.mssante.fr")
            smtp.rcpt("secretariat@relais.localhost")
            code, _ = smtp.data(mail)
            dt = time.perf_counter() - t0
            if time.time() >= start_at:
                if code == 250:
                    latencies.append(dt)
                else:
                    refused += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pipe.send((latencies, refused, (usage.ru_utime + usage.ru_stime) * n_measured_share(latencies, n)))
    pipe.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(sessions: int, raw: bytes, args: argparse.Namespace) -> tuple[int, float, float, float, int, float, float]:
    with tempfile.TemporaryDirectory(prefix="relais-mailbench-") as tmp:
        port = free_port()
        config = Path(tmp) / "config.toml"
        listener = f"""[[listeners.smtp]]
name = "smtp"
port = {port}
domains = ["relais.localhost"]
readers = {args.readers}
accounts = [{{ user = "{USER}", password_hash = "{hash_password(PASSWORD, n=2**12)}" }}]
"""
        config.write_text(
            relais_config(
                listener,
                store=f"inline_payload_limit = {args.inline_limit}",
                sections=f"[ingest]\nbatch_window_ms = {args.batch_window_ms}\n{commit_on_loop(args)}",
            )
        )
        log = open(Path(tmp) / "relais.log", "wb")  # noqa: SIM115
        relais = [str(Path(sys.executable).parent / "relais")]
        if args.profile:
            relais = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "engine.cli"]
        proc = subprocess.Popen(
            [*relais, "--config", str(config), "run"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
        try:
            wait_listening(proc, port)
            start_at = time.time() + args.warmup + 0.5
            stop_at = start_at + args.duration
            pipes, procs = [], []
            for wid in range(sessions):
                parent, child = mp.Pipe(duplex=False)
                p = mp.Process(target=client, args=(port, wid, raw, start_at, stop_at, child, args.client_nodelay))
                p.start()
                pipes.append(parent)
                procs.append(p)
            time.sleep(max(0.0, start_at - time.time()))
            cpu_start = cpu_seconds(proc.pid)
            time.sleep(max(0.0, stop_at - time.time()))
            cpu = cpu_seconds(proc.pid) - cpu_start
            latencies: list[float] = []
            refused = 0
            client_cpu = 0.0
            for pipe in pipes:
                lat, ref, cpu_used = pipe.recv()
                latencies += lat
                refused += ref
                client_cpu += cpu_used
            for p in procs:
                p.join()
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    latencies.sort()
    n = len(latencies)
    p50 = statistics.median(latencies) * 1000 if n else 0.0
    p99 = latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0
    return n, n / args.duration, p50, p99, refused, cpu * 1000 / max(n, 1), client_cpu * 1000 / max(n, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8], help="default: 1 4 8")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--attachment-kb", type=int, default=100, help="size of the XDM's PDF (default 100)")
    ap.add_argument("--batch-window-ms", type=float, default=0.0)
    ap.add_argument("--commit-on-loop", choices=["on", "off"], help="[ingest] commit_on_loop (default: the engine's)")
    ap.add_argument("--inline-limit", type=int, default=262144, help="[store] inline_payload_limit (default 256 KB)")
    ap.add_argument("--readers", type=int, default=0, help="[[listeners.smtp]] readers processes (default 0)")
    ap.add_argument("--profile", help="write Relais's cProfile stats to this file")
    ap.add_argument(
        "--client-nodelay",
        action="store_true",
        help="TCP_NODELAY in the smtplib clients (default: off, as in smtplib and most MTAs)",
    )
    args = ap.parse_args()
    raw = bench_mail(args.attachment_kb)
    print(f"mail: {len(raw) / 1024:.0f} KB on the wire (IHE_XDM.ZIP with a {args.attachment_kb} KB PDF + a CDA)")
    print(f"{'sessions':>8} {'mails':>7} {'mails/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8} "
          f"{'relais cpu ms/mail':>18} {'clients cpu ms/mail':>19}")  # fmt: skip
    for sessions in args.sessions:
        n, rate, p50, p99, refused, cpu, client_cpu = run_one(sessions, raw, args)
        print(f"{sessions:>8} {n:>7} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {refused:>8} "
              f"{cpu:>18.2f} {client_cpu:>19.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
