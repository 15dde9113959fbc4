"""DICOM C-STORE ingest benchmark: instances/s of Relais, Orthanc and DCMTK storescp on the
same data in the same run (small ~39 KB and large ~0.5 MB instances, 1 and 4 associations).

The load is DCMTK `storescu` (one process per association, TCP_NODELAY=1); each server runs
as its own process on loopback with its default durable settings.

    .venv/bin/python bench/dicom_ingest.py [--small 400] [--large 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import free_port, relais_config, running
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_instances(folder: Path, count: int, large: bool, associations: int) -> list[Path]:
    """`count` CT instances with new UIDs in one study, spread over `associations` folders."""
    source = get_testdata_file("CT_small.dcm")
    assert source is not None
    ds = dcmread(source)
    if large:  # 512 x 512 x 16 bit: ~0.5 MB
        ds.Rows = ds.Columns = 512
        ds.PixelData = random.Random(7).randbytes(512 * 512 * 2)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    dirs = [folder / f"assoc{i}" for i in range(associations)]
    for d in dirs:
        d.mkdir(parents=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = dirs[i % associations] / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return dirs


def relais_server(
    home: Path, port: int, store: str = "", sections: str = ""
) -> tuple[list[str], str, Callable[[], int]]:
    listener = f'[[listeners.dicom]]\nname = "bench"\nhost = "127.0.0.1"\nport = {port}\nae_title = "RELAIS"\n'
    (home / "config.toml").write_text(relais_config(listener, store, sections), encoding="utf-8")

    def count() -> int:
        with sqlite3.connect(home / "data" / "relais.db") as db:
            return int(db.execute("SELECT count(*) FROM relais_messages WHERE status = 'accepted'").fetchone()[0])

    return [str(BIN / "relais"), "--config", str(home / "config.toml"), "run"], "RELAIS", count


def orthanc_server(home: Path, port: int) -> tuple[list[str], str, Callable[[], int]]:
    config = {
        "Name": "bench",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
    }
    (home / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    return ["Orthanc", str(home / "orthanc.json")], "ORTHANC", lambda: -1


def storescp_server(home: Path, port: int) -> tuple[list[str], str, Callable[[], int]]:
    out = home / "received"
    out.mkdir()
    cmd = ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)]
    return cmd, "STORESCP", lambda: sum(1 for _ in out.iterdir())


def relais_files_server(home: Path, port: int) -> tuple[list[str], str, Callable[[], int]]:
    """Relais with every instance a blob file (no instance stored in the database), for A/B."""
    return relais_server(home, port, "inline_payload_limit = 0")


def relais_ckpt_server(home: Path, port: int, interval: float) -> tuple[list[str], str, Callable[[], int]]:
    """Relais with another WAL checkpoint interval, for A/B."""
    return relais_server(home, port, f"checkpoint_interval = {interval}")


def relais_acceptors_server(home: Path, port: int, count: int) -> tuple[list[str], str, Callable[[], int]]:
    """Relais with its listeners in `count` acceptor processes ([ingest] acceptors)."""
    return relais_server(home, port, sections=f"[ingest]\nacceptors = {count}\n")


def relais_writer_server(home: Path, port: int, acceptors: int) -> tuple[list[str], str, Callable[[], int]]:
    """Relais committing in a process of its own ([ingest] writer_process)."""
    return relais_server(home, port, sections=f"[ingest]\nacceptors = {acceptors}\nwriter_process = true\n")


def relais_loop_server(home: Path, port: int) -> tuple[list[str], str, Callable[[], int]]:
    """Relais committing on its event loop ([ingest] commit_on_loop)."""
    return relais_server(home, port, sections="[ingest]\ncommit_on_loop = true\n")


SERVERS = {
    "relais": relais_server,
    "relais-files": relais_files_server,
    "relais-ckpt1": functools.partial(relais_ckpt_server, interval=1.0),  # the default before RESULTS §17
    "relais-acceptors2": functools.partial(relais_acceptors_server, count=2),
    "relais-acceptors4": functools.partial(relais_acceptors_server, count=4),
    "relais-loop": relais_loop_server,
    "relais-writer": functools.partial(relais_writer_server, acceptors=0),
    "relais-writer-acceptors4": functools.partial(relais_writer_server, acceptors=4),
    "orthanc": orthanc_server,
    "storescp": storescp_server,
}


def send(port: int, called: str, dirs: list[Path]) -> tuple[float, int]:
    """One storescu per folder, all at once; (seconds until the last one finished, failures)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "+sd", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), str(d)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        for d in dirs
    ]
    failures = 0
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            failures += 1
            sys.stderr.write(err.decode(errors="replace")[-500:])
    return time.perf_counter() - start, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=400, help="small instances per case")
    parser.add_argument("--large", type=int, default=200, help="large instances per case")
    parser.add_argument("--servers", default="relais,orthanc,storescp")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--cases", default="small:1,small:4,large:1,large:4", help="size:associations, ...")
    args = parser.parse_args()
    servers = args.servers.split(",")
    needed = ["storescu"] + ["storescp"] * ("storescp" in servers) + ["Orthanc"] * ("orthanc" in servers)
    for tool in needed:
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install dcmtk orthanc)", file=sys.stderr)
            return 2
    cases = [(size, int(assoc)) for size, assoc in (case.split(":") for case in args.cases.split(","))]
    names = servers
    runs: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="relais-dicom-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Rounds interleave the servers, so a noisy minute does not fall on one of them only;
        # each round sends new instances (a resend would be a cheaper duplicate).
        for round_no in range(args.rounds):
            for name in names:
                home = tmp / f"{name}{round_no}"
                data = {}
                for size, assoc in cases:
                    count = args.small if size == "small" else args.large
                    folder = home / "data" / f"{size}{assoc}"
                    data[(size, assoc)] = (make_instances(folder, count, size == "large", assoc), count)
                warm = make_instances(home / "data" / "warm", 8, False, 1)
                # Flushed untimed before each server starts and after it stops: a server that
                # leaves its writes to the kernel's writeback (Orthanc, storescp) must not bill
                # them to the next one, nor the writing of the test files to anyone.
                os.sync()
                port = free_port()
                cmd, called, count_stored = SERVERS[name](home, port)
                with running(cmd, port, home / "server.log", cwd=home, env=ENV, settle=0.5):
                    send(port, called, warm)
                    for size, assoc in cases:
                        dirs, count = data[(size, assoc)]
                        seconds, failures = send(port, called, dirs)
                        rate = count / seconds if not failures else float("nan")
                        runs.setdefault((name, size, assoc), []).append(rate)
                        print(f"  round {round_no + 1} {name:9} {size:5} x{assoc}: {count} in {seconds:.2f} s = "
                              f"{rate:.0f}/s", file=sys.stderr)  # fmt: skip
                    stored = count_stored()
                    if stored >= 0:
                        expected = 8 + sum(c for _, c in data.values())
                        print(f"  {name}: {stored} instances stored of {expected} sent", file=sys.stderr)
                os.sync()
                shutil.rmtree(home / "data")
    results = {key: statistics.median(rates) for key, rates in runs.items()}
    width = max(11, *(len(n) + 2 for n in names))
    compared = "relais" in names and "orthanc" in names  # the ratio column only when both ran
    print(f"\n{'case':<26}" + "".join(f"{n:>{width}}" for n in names) + ("  relais/orthanc" if compared else ""))
    for size, assoc in cases:
        row = [results.get((n, size, assoc), float("nan")) for n in names]
        label = f"{size} ({'~39 KB' if size == 'small' else '~0.5 MB'}), {assoc} assoc"
        line = f"{label:<26}" + "".join(f"{r:>{width}.0f}" for r in row)
        if compared:
            line += f"  {results[('relais', size, assoc)] / results[('orthanc', size, assoc)]:>13.2f}x"
        print(line)
    note = f"instances/s, median of {args.rounds} interleaved rounds"
    print(f"({note}; storescu with TCP_NODELAY=1, one process per association)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
