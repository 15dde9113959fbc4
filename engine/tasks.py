"""Small helpers for the engine's long-running asyncio tasks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "in_thread"]

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has really stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread` for work on the store: a cancelled caller unwinds only once the
    thread has finished.

    `to_thread` lets the task go at once while its thread runs on, so a component stopped
    in the middle of a query would let the engine close the store under that query (a
    closed SQLite connection used from another thread crashes the process).
    """
    work = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: the caller is going away, its error with it
        raise
