"""What every benchmark needs to run a server: a free loopback port, a process started and
waited for until it listens, and stopped (its whole process group) on the way out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "commit_on_loop", "free_port", "relais_config", "running", "wait_listening"]

ROOT = Path(__file__).resolve().parent.parent


def relais_config(listeners: str, store: str = "", sections: str = "") -> str:
    """A benchmark's config.toml: SQLite and blobs under data/, routing off, warnings only, no
    MLLP listener; `listeners` is the TOML of the listener under test, `store` more [store]
    keys, `sections` more sections."""
    return (
        f'[store]\nurl = "sqlite:///data/relais.db"\nblob_dir = "data/blobs"\n{store}\n'
        f'{sections}\n[routing]\nenabled = false\n\n[log]\nlevel = "warning"\n\n[listeners]\nmllp = []\n\n'
        f"{listeners}"
    )


def commit_on_loop(args: Any) -> str:
    """The `[ingest]` line a bench's `--commit-on-loop on|off` asks for ('' : the engine's default)."""
    if not getattr(args, "commit_on_loop", None):
        return ""
    return f"commit_on_loop = {'true' if args.commit_on_loop == 'on' else 'false'}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s")


@contextmanager
def running(
    cmd: list[str],
    port: int,
    log: Path,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
    settle: float = 0.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait for its port (then `settle` seconds); SIGTERM (then
    SIGKILL) its process group on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            wait_listening(proc, port)
            time.sleep(settle)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
