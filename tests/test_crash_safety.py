"""Crash safety: SIGKILL the engine under load, restart it on the same data, check nothing ACKed is lost.

"Nothing is acknowledged before it is durable" (ARCHITECTURE.md): the engine runs as a real
`relais run` subprocess, several MLLP senders (python-hl7's `MLLPClient`, and raw sockets that
pipeline frames) push messages with unique control IDs and remember which ones got `MSA|AA`; the
process is killed with SIGKILL at a random moment, restarted, and so on. Every ACKed message must
then be in the store with its exact bytes, the hash chain must verify, and `relais check` must find
no event without its payload (a blob without event is tolerated: the trace of a kill between the
blob's fsync and the commit). Rounds alternate the inline payload limit so that both the payload
table and the blob folder are written. Reproduce a run with RELAIS_CRASH_SEED=<seed>.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from hl7.client import MLLPClient

from event_store import EventStore
from event_store.blobs import BlobStore, sha256_hex
from tests.conftest import adt

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
HOST = "127.0.0.1"
ROUNDS = 4
SENDERS = 6  # half python-hl7 MLLPClient, half raw sockets pipelining 1-4 frames
# inline_payload_limit per round: messages are ~0.6-4 KB, so 1000 and 0 send many or all to blobs
INLINE_LIMITS = (262144, 1000, 0, 1000, 262144)
SENDER_ID = "SIH_CHU|CHU_EXEMPLE"


def _relais_cmd() -> list[str]:
    script = Path(sys.executable).with_name("relais")
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_relais_cmd(), "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


class Engine:
    """`relais run` as a subprocess on a fixed port; every process it started is reaped by close()."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.config = workdir / "config.toml"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, inline_limit: int) -> None:
        self.config.write_text(
            "[store]\n"
            'url = "sqlite:///relais.db"\n'
            'blob_dir = "blobs"\n'
            f"inline_payload_limit = {inline_limit}\n"
            "[log]\n"
            'level = "warning"\n'
            "[[listeners.mllp]]\n"
            'name = "mllp"\n'
            f"host = {HOST!r}\n"
            f"port = {self.port}\n",
            encoding="utf-8",
        )
        n = len(self.procs)
        with (self.workdir / f"engine-{n}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [*_relais_cmd(), "--config", str(self.config), "run"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )  # fmt: skip
        self.procs.append(self.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relais run exited with {self.proc.returncode} at start:\n{self.log()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"relais run did not listen on {self.port} within 30 s:\n{self.log()}")

    def sigkill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"engine died by itself:\n{self.log()}"
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> int:
        """Graceful stop (SIGTERM), returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def log(self) -> str:
        logs = sorted(self.workdir.glob("engine-*.log"))
        return logs[-1].read_text(errors="replace")[-4000:] if logs else ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(tmp_path, _free_port())
    try:
        yield eng
    finally:
        eng.close()


@dataclass
class Ledger:
    """What the senders know: every payload sent, by control ID, and the control IDs ACKed AA."""

    sent: dict[str, bytes] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)  # control ID -> round of its first AA
    acks_per_round: list[list[str]] = field(default_factory=list)  # in the order they arrived
    lock: threading.Lock = field(default_factory=threading.Lock)
    round: int = 0
    unexpected: list[str] = field(default_factory=list)

    def ack(self, control_id: str) -> None:
        with self.lock:
            self.acked.setdefault(control_id, self.round)
            self.acks_per_round[self.round].append(control_id)


def _parse_acks(frames: list[bytes]) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of each ACK frame."""
    out = []
    for raw in frames:
        text = raw.decode("utf-8", errors="replace")
        msa = next((s for s in text.split("\r") if s.startswith("MSA")), "")
        fields = msa.split(text[3:4] or "|")
        out.append((fields[1] if len(fields) > 1 else "", fields[2] if len(fields) > 2 else ""))
    return out


def _read_frames(sock: socket.socket, buf: bytearray, count: int) -> list[bytes]:
    """Read until `count` whole MLLP frames are in buf; raises ConnectionError if the peer goes."""
    frames: list[bytes] = []
    while len(frames) < count:
        end = buf.find(EB)
        if end >= 0:
            start = buf.find(SB)
            frames.append(bytes(buf[start + 1 : end]))
            del buf[: end + 1]
            if buf[:1] == CR:
                del buf[:1]
            continue
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("server closed the connection")
        buf += data
    return frames


class Sender:
    """One sending interface: sends new messages, resends what was not ACKed after a reconnect."""

    def __init__(self, number: int, ledger: Ledger, rng: random.Random, *, use_hl7_client: bool) -> None:
        self.number = number
        self.ledger = ledger
        self.rng = rng
        self.use_hl7_client = use_hl7_client
        self.seq = 0
        self.unacked: list[str] = []  # sent, no AA seen: a real sender resends these

    def _new_message(self) -> str:
        self.seq += 1
        control_id = f"CS{self.number:02d}{self.seq:07d}"
        extra: tuple[str, ...] = ()
        if self.rng.random() < 0.5:  # make some payloads larger than a 1000-byte inline limit
            extra = tuple(f"NTE|{i + 1}||{'note ' * self.rng.randint(20, 200)}" for i in range(2))
        text = adt(
            self.rng.choice(["A01", "A04", "A08"]), control_id=control_id, ipp=f"{self.number}{self.seq}",
            family="LEFÈVRE-ÇA", extra_segments=extra,
        )  # fmt: skip
        with self.ledger.lock:
            self.ledger.sent[control_id] = text.encode("utf-8")
        return control_id

    def _take_ack(self, expected: list[str], acks: list[tuple[str, str]]) -> None:
        for (code, control_id), want in zip(acks, expected, strict=True):
            if code != "AA" or control_id != want:
                self.ledger.unexpected.append(f"sent {want}, got MSA|{code}|{control_id}")
                continue
            self.ledger.ack(control_id)
            self.unacked.remove(control_id)

    def run(self, port: int, stop: threading.Event, *, drain: bool = False) -> None:
        """Send until `stop` is set (or, with drain, until every unACKed message is ACKed)."""
        while not stop.is_set():
            if drain and not self.unacked:
                return
            try:
                self._session(port, stop, drain)
            except OSError:
                time.sleep(0.01)  # killed server: reset, refused, closed; try again until stopped

    def _session(self, port: int, stop: threading.Event, drain: bool) -> None:
        if self.use_hl7_client:
            client = MLLPClient(HOST, port)
            sock = client.socket
        else:
            client = None
            sock = socket.create_connection((HOST, port))
        sock.settimeout(15)
        buf = bytearray()
        try:
            while not stop.is_set():
                burst = list(self.unacked[:4])  # resend first, in order
                if not burst and drain:
                    return
                if not burst:
                    burst = [self._new_message() for _ in range(1 if client else self.rng.randint(1, 4))]
                    self.unacked.extend(burst)
                if client is not None:
                    burst = burst[:1]
                    first = client.send_message(self.ledger.sent[burst[0]])
                    if not first:
                        raise ConnectionResetError("server closed the connection")
                    buf += first
                else:
                    sock.sendall(b"".join(SB + self.ledger.sent[c] + EB + CR for c in burst))
                self._take_ack(burst, _parse_acks(_read_frames(sock, buf, len(burst))))
        finally:
            sock.close()


def _run_load(engine: Engine, senders: list[Sender], seconds: float, *, drain: bool = False) -> None:
    stop = threading.Event()
    threads = [
        threading.Thread(target=s.run, args=(engine.port, stop), kwargs={"drain": drain}, daemon=True) for s in senders
    ]
    for t in threads:
        t.start()
    try:
        if drain:
            deadline = time.monotonic() + seconds
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            # The kill's moment counts from the round's first ACK: an engine just started (its
            # router process still importing on a 2-vCPU machine) may take longer than the
            # shortest kill delay to commit anything, and a round with no ACK proves nothing.
            ledger = senders[0].ledger
            deadline = time.monotonic() + 30
            while not ledger.acks_per_round[ledger.round] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(seconds)
            engine.sigkill()  # under load: senders are mid-send or waiting for their ACK
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert not any(t.is_alive() for t in threads), "a sender thread is stuck"


def _stored(config: Path) -> dict[str, list[dict[str, object]]]:
    """control ID -> index rows, read with `relais messages list --json` (a real subprocess)."""
    out = _cli(config, "messages", "list", "--json", "--limit", "1000000")
    assert out.returncode == 0, out.stderr
    rows: dict[str, list[dict[str, object]]] = {}
    for line in out.stdout.splitlines():
        row = orjson.loads(line)
        rows.setdefault(str(row["control_id"]), []).append(row)
    return rows


def _check_acked_are_stored(config: Path, ledger: Ledger, context: str) -> dict[str, list[dict[str, object]]]:
    stored = _stored(config)
    lost = sorted(set(ledger.acked) - set(stored))
    assert not lost, f"{context}: {len(lost)} ACKed message(s) missing from the store, e.g. {lost[:5]}"
    twice = {c: len(r) for c, r in stored.items() if len(r) > 1}
    assert not twice, f"{context}: resends stored as new messages instead of duplicates: {twice}"
    strangers = sorted(set(stored) - set(ledger.sent))
    assert not strangers, f"{context}: messages nobody sent: {strangers[:5]}"
    for control_id in ledger.acked:
        (row,) = stored[control_id]
        assert (row["status"], row["ack_code"], row["sender"]) == ("accepted", "AA", SENDER_ID), row
    return stored


def _verify_and_check(config: Path, context: str) -> list[str]:
    """`relais verify` and `relais check` (both must exit 0); returns the orphan blobs listed."""
    with ThreadPoolExecutor(2) as pool:
        verify, check = pool.map(lambda cmd: _cli(config, cmd), ["verify", "check"])
    assert verify.returncode == 0, f"{context}: relais verify failed:\n{verify.stdout}{verify.stderr}"
    assert "chain ok" in verify.stdout
    assert check.returncode == 0, f"{context}: relais check failed:\n{check.stdout}{check.stderr}"
    return [line.split()[1] for line in check.stdout.splitlines() if line.strip().startswith("orphan ")]


@pytest.mark.slow
def test_every_acked_message_survives_sigkill(engine: Engine) -> None:
    seed = int(os.environ.get("RELAIS_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    ledger = Ledger()
    senders = [Sender(i, ledger, random.Random(rng.random()), use_hl7_client=i % 2 == 0) for i in range(SENDERS)]
    ctx = f"seed {seed}"
    started = time.monotonic()
    kills: list[float] = []

    engine.start(INLINE_LIMITS[0])
    for n in range(ROUNDS):
        ledger.round = n
        ledger.acks_per_round.append([])
        kill_after = rng.uniform(0.3, 1.5)
        kills.append(round(kill_after, 2))
        _run_load(engine, senders, kill_after)
        where = f"{ctx}, after SIGKILL #{n + 1} at {kill_after:.2f} s"
        assert not ledger.unexpected, f"{where}: unexpected ACKs: {ledger.unexpected[:5]}"
        assert ledger.acks_per_round[n], f"{where}: no message was ACKed in this round:\n{engine.log()}"
        # The crashed store opens from a fresh process: chain intact, no event without payload.
        _verify_and_check(engine.config, where)
        # Restart on the same data; the ACKed messages are there, the engine serves again.
        engine.start(INLINE_LIMITS[n + 1])
        _check_acked_are_stored(engine.config, ledger, f"{where}, restarted")

    # Last life: senders resend what never got an ACK (the ordinary MLLP sender's behaviour), and
    # every resend of a message committed before a kill is recognised as a duplicate.
    ledger.round = ROUNDS
    ledger.acks_per_round.append([])
    _run_load(engine, senders, 20, drain=True)
    assert not any(s.unacked for s in senders), f"{ctx}: resends not ACKed: {[s.unacked for s in senders]}"
    assert ledger.acked.keys() == ledger.sent.keys()
    assert engine.stop() == 0, engine.log()

    stored = _check_acked_are_stored(engine.config, ledger, f"{ctx}, final")
    orphans = _verify_and_check(engine.config, f"{ctx}, final")
    db = engine.workdir / "relais.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        by_place = dict(conn.execute("SELECT payload_inline, count(*) FROM relais_messages GROUP BY 1"))
        blob_hashes = {h for (h,) in conn.execute("SELECT payload_sha256 FROM relais_messages "
                                                  "WHERE payload_inline = 0")}  # fmt: skip
        topics = dict(conn.execute("SELECT topic, count(*) FROM stored_events GROUP BY 1"))
    conn.close()
    assert by_place.get(1) and by_place.get(0), f"both payload places must be exercised: {by_place}"
    assert not set(orphans) & blob_hashes, "check listed a referenced blob as an orphan"
    assert topics.get("relais.MessageReceived") == len(ledger.sent), topics
    leftovers = [p.name for p in (engine.workdir / "blobs").glob("??/.*")]
    for log in engine.workdir.glob("engine-*.log"):
        assert '"level": "error"' not in log.read_text(errors="replace"), f"{log.name}:\n{log.read_text()}"

    # Every ACKed message's bytes, exactly (read with the store, checked against the hash)...
    store = EventStore.open(f"sqlite:///{db}", engine.workdir / "blobs")
    try:
        found = store.find_messages((SENDER_ID, control_id) for control_id in ledger.acked)
        for control_id in ledger.acked:
            (row,) = found[(SENDER_ID, control_id)]
            assert store.payload(row["payload_sha256"]) == ledger.sent[control_id], control_id
    finally:
        store.close()

    # ...and a sample through `relais messages show --json`: the last ACKs before each kill (the
    # riskiest: committed just before the process died) and a few random ones.
    sample = {c for acks in ledger.acks_per_round[:ROUNDS] for c in acks[-2:]}
    sample |= set(rng.sample(sorted(ledger.acked), min(6, len(ledger.acked))))
    with ThreadPoolExecutor(4) as pool:
        shows = dict(zip(sample, pool.map(
            lambda c: _cli(engine.config, "messages", "show", str(stored[c][0]["id"]), "--json"), sample
        ), strict=True))  # fmt: skip
    for control_id, out in shows.items():
        assert out.returncode == 0, out.stderr
        shown = orjson.loads(out.stdout)
        assert shown["payload"].encode("latin-1") == ledger.sent[control_id], control_id
        assert shown["events"][0]["type"] == "MessageReceived"
        assert shown["metadata"]["control_id"] == control_id

    print(
        f"\ncrash safety: seed {seed}, kills at {kills} s, {len(ledger.acked)} messages ACKed "
        f"(per life: {[len(a) for a in ledger.acks_per_round]}), "
        f"{topics.get('relais.DuplicateReceived', 0)} resends recognised as duplicates, inline/blob "
        f"{by_place.get(1)}/{by_place.get(0)}, {len(orphans)} orphan blob(s), {len(leftovers)} temp file(s) "
        f"left in the blob folder, {time.monotonic() - started:.1f} s"
    )


def test_check_tolerates_an_orphan_blob_but_never_an_event_without_its_blob(engine: Engine) -> None:
    """What a kill can leave (bytes fsynced, commit never made) is reported, not an error; a lost
    payload is an error."""
    engine.start(0)  # every payload to the blob folder
    payload = adt("A01", control_id="ORPHANTEST1").encode()
    with MLLPClient(HOST, engine.port) as client:
        client.socket.settimeout(15)
        assert b"MSA|AA|ORPHANTEST1" in client.send_message(payload)
    assert engine.stop() == 0, engine.log()

    blobs = BlobStore(engine.workdir / "blobs")
    orphan = b"bytes written and fsynced by a process killed before its commit"
    blobs.put(sha256_hex(orphan), orphan)
    (blobs.path_of(sha256_hex(payload)).parent / f".{sha256_hex(orphan)}.1234.tmp").write_bytes(b"half")
    out = _cli(engine.config, "check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"orphan {sha256_hex(orphan)}" in out.stdout
    assert "orphan blobs (bytes with no event, harmless): 1" in out.stdout  # the .tmp is not a blob

    blobs.path_of(sha256_hex(payload)).unlink()
    out = _cli(engine.config, "check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"MISSING {sha256_hex(payload)}" in out.stdout
