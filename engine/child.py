"""The engine's side of a child process (router process, writer process): the Unix socket it
connects to, its start, its signs of life, and its supervision (one that dies, or hangs, is
started again).

    child = Child("writer_process", _writer_main, lambda path: (config, path), serve)
    await child.listen(); await child.spawn()
    # in `serve`: child.heard(writer) for each frame, child.connected(writer, pid) on its hello
    child.supervise(on_death=..., on_restart=...)   # a task
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from engine.wire import HANG_TIMEOUT, kill_if_hung

__all__ = ["Child", "InChild"]

log = structlog.get_logger("relais.child")

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Child:
    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args_of: Callable[[str], tuple[Any, ...]],
        serve: Serve,
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name  # "writer_process": its log events and messages
        self.target = target
        self.args_of = args_of  # the socket path -> the target's arguments (read at each start)
        self.serve = serve
        self.start_timeout = start_timeout
        self.hang_timeout = HANG_TIMEOUT
        self.restarts = 0
        self.proc: Any = None
        self.link: asyncio.StreamWriter | None = None
        self._alive_at = 0.0  # loop time of the last frame from the current process
        self._ctx = mp.get_context("spawn")
        self._dir = Path(tempfile.mkdtemp(prefix="relais-"))  # Unix socket paths: ~100 bytes at most
        self.path = self._dir / f"{name.split('_')[0]}.sock"
        self._server: asyncio.Server | None = None
        self._connected: asyncio.Queue[tuple[asyncio.StreamWriter, int]] = asyncio.Queue()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def _what(self) -> str:
        return self.name.replace("_", " ")

    async def listen(self) -> None:
        self._server = await asyncio.start_unix_server(self.serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    def connected(self, writer: asyncio.StreamWriter, pid: int) -> None:
        """A process said hello on `writer` (`spawn` keeps the one it started)."""
        self._connected.put_nowait((writer, pid))

    def heard(self, writer: asyncio.StreamWriter) -> None:
        """A frame came on `writer`: the current process, if it is its link, is alive."""
        if writer is self.link:
            self._alive_at = asyncio.get_running_loop().time()

    async def spawn(self) -> None:
        """Start the process and wait for its hello; RuntimeError if it exits or is too slow."""
        while not self._connected.empty():
            self._connected.get_nowait()
        self.proc = self._ctx.Process(
            target=self.target, args=self.args_of(str(self.path)), name=f"relais-{self.name.split('_')[0]}",
            daemon=True,
        )  # fmt: skip
        self.proc.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            try:
                async with asyncio.timeout(0.2):
                    writer, pid = await self._connected.get()
            except TimeoutError:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the {self._what} exited while starting (code {self.proc.exitcode})") from None
                if loop.time() > deadline:
                    raise RuntimeError(f"the {self._what} did not start in time") from None
                continue
            if pid == self.proc.pid:
                self.link = writer
                self._alive_at = loop.time()
                return

    async def supervise(self, on_death: Callable[[], Awaitable[None]], on_restart: Callable[[], None]) -> None:
        """Kill the process if it hangs; when it is gone, `on_death`, start another (with
        backoff, loudly, until one starts), then `on_restart`."""
        delay = 0.5
        while True:
            await asyncio.sleep(0.2)
            if self.proc.is_alive():
                kill_if_hung(self.proc, self._alive_at, self.hang_timeout, self.name)
                continue
            log.error(f"{self.name}_died", exitcode=self.proc.exitcode, restarts=self.restarts)
            self.link = None
            await on_death()
            try:
                await self.spawn()
            except Exception as e:  # keep trying, loudly: its work stops meanwhile
                log.error(f"{self.name}_not_started", error=type(e).__name__, detail=str(e)[:200])
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            self.restarts += 1
            delay = 0.5
            log.warning(f"{self.name}_restarted", pid=self.proc.pid, restarts=self.restarts)
            on_restart()

    async def end(self, terminate: bool) -> None:
        """Wait for the process to exit (after SIGTERM if `terminate`), SIGKILL it past 10 s."""
        if self.proc is None:
            return
        if terminate and self.proc.is_alive():
            self.proc.terminate()
        await asyncio.to_thread(self.proc.join, 10)
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 5)
        self.proc = None

    def close(self) -> None:
        """Stop listening and remove the socket (once the process has ended)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._dir.rmdir()


class InChild:
    """A component whose work runs in a child process (`self.child`): its pid and restarts,
    for `relais status`, logs and tests."""

    child: Child

    @property
    def pid(self) -> int | None:
        return self.child.pid

    @property
    def restarts(self) -> int:
        return self.child.restarts
