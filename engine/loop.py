"""The event loop every Relais process runs on: uvloop (libuv, in C) where it is installed,
else asyncio's own.

The engine is bound by its CPU: on the end-to-end bench, uvloop took ~10 % of the CPU a
message costs and halved the lag p99 (bench/RESULTS.md §23). `RELAIS_EVENT_LOOP=asyncio`
chooses asyncio's loop (to tell a loop problem from an engine one); the child processes
inherit the choice with the environment.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["loop_kind", "new_event_loop", "run"]

T = TypeVar("T")

_KINDS = ("uvloop", "asyncio")


def loop_kind() -> str:
    """'uvloop' or 'asyncio': what `RELAIS_EVENT_LOOP` asks for, uvloop by default when it
    can be imported."""
    asked = os.environ.get("RELAIS_EVENT_LOOP", "").strip().lower()
    if asked and asked not in _KINDS:
        raise ValueError(f"RELAIS_EVENT_LOOP={asked!r}: expected one of {', '.join(_KINDS)}")
    if asked == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if asked == "uvloop":
            raise ValueError("RELAIS_EVENT_LOOP=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the loop `loop_kind` names."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
