"""Crash safety of the DICOM listener: SIGKILL `relais run` while SCUs store, restart it on the
same data, again and again. Every instance that got Success (0x0000) must be stored whole (its
SHA-256 checks), whatever moment the process died at: small instances in the database with
their events, large ones as blob files synced before their commit."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from event_store import EventStore
from tests.dicom_files import sample

SCUS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(workdir: Path, port: int, n: int) -> subprocess.Popen[bytes]:
    config = workdir / "config.toml"
    config.write_text(
        '[store]\nurl = "sqlite:///relais.db"\nblob_dir = "blobs"\n[log]\nlevel = "warning"\n'
        "[listeners]\nmllp = []\n"
        f'[[listeners.dicom]]\nname = "dicom"\nhost = "127.0.0.1"\nport = {port}\nae_title = "RELAIS"\n',
        encoding="utf-8",
    )
    script = Path(sys.executable).with_name("relais")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]
    with (workdir / f"engine-{n}.log").open("wb") as log:
        proc = subprocess.Popen([*cmd, "--config", str(config), "run"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / f"engine-{n}.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise AssertionError("relais run did not listen within 30 s")


class Scu(threading.Thread):
    """Stores new instances until stopped, reconnecting after each kill; remembers the successes."""

    def __init__(self, port: int, source: Path, padding: int = 0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ds = dcmread(source)
        if padding:  # a private element makes it larger than what is stored inline
            self.ds.add_new(0x00091010, "LO", "RELAIS TEST")  # private creator
            self.ds.add_new(0x00091011, "OB", b"\x00" * padding)
        self.stored: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, self.ds.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        while not self.stop.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title="RELAIS")
            if not assoc.is_established:
                time.sleep(0.05)
                continue
            try:
                while not self.stop.is_set() and assoc.is_established:
                    self.ds.SOPInstanceUID = generate_uid()
                    try:
                        status = assoc.send_c_store(self.ds)
                    except RuntimeError:  # the server was killed between the check and the send
                        break
                    if status and status.Status == 0x0000:
                        self.stored.append(str(self.ds.SOPInstanceUID))
            finally:
                if assoc.is_established:
                    assoc.release()


@pytest.mark.slow
def test_every_instance_answered_success_survives_sigkill(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("RELAIS_CRASH_SEED", time.time_ns() % 1_000_000)))
    port = _free_port()
    source = sample("CT_small.dcm", tmp_path)
    scus = [Scu(port, source, padding=300_000 if n == 0 else 0) for n in range(SCUS)]
    procs = [_start(tmp_path, port, 0)]
    for scu in scus:
        scu.start()
    try:
        for n in range(1, 4):
            time.sleep(rng.uniform(0.4, 1.2))
            os.kill(procs[-1].pid, signal.SIGKILL)  # SCUs are mid-transfer or waiting for a status
            assert procs[-1].wait(10) == -signal.SIGKILL
            procs.append(_start(tmp_path, port, n))
        time.sleep(0.5)
    finally:
        for scu in scus:
            scu.stop.set()
        for scu in scus:
            scu.join(15)
        procs[-1].send_signal(signal.SIGTERM)
        procs[-1].wait(20)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    leftovers = list((tmp_path / "blobs" / "spool").iterdir())
    assert not leftovers, f"spool files left behind after a clean stop: {leftovers[:3]}"
    succeeded = [uid for scu in scus for uid in scu.stored]
    assert len(succeeded) > 20, "the SCUs hardly stored anything: the test proves nothing"
    store = EventStore.open(f"sqlite:///{tmp_path / 'relais.db'}", tmp_path / "blobs")
    try:
        stored = {e.event["sop_instance_uid"]: e.event["sha256"] for e in store.read_log()
                  if e.topic == "relais.InstanceReceived"}  # fmt: skip
        lost = [uid for uid in succeeded if uid not in stored]
        assert not lost, f"{len(lost)} instance(s) answered Success are not stored, e.g. {lost[:3]}"
        for uid in succeeded:
            data = store.payload(stored[uid])  # checks the bytes against their hash
            assert hashlib.sha256(data).hexdigest() == stored[uid], f"instance {uid} is not whole"
            assert uid.encode() in data[:2048]
        places = {bool(store.blobs.exists(stored[uid])) for uid in succeeded}
        assert places == {True, False}, "both the inline and the blob-file paths must be exercised"
    finally:
        store.close()
