"""How every Relais process runs: on uvloop (libuv, in C) where it is installed, else on
asyncio's own loop, with a garbage collector tuned for a server.

On the end-to-end bench, uvloop halved the lag p99 from ACK to delivery at the same
throughput (bench/RESULTS.md §23). `RELAIS_EVENT_LOOP=asyncio` chooses asyncio's loop (to
tell a loop problem from an engine one); the child processes inherit the choice with the
environment.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["loop_kind", "new_event_loop", "run", "tune_gc"]

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


# A message allocates many objects and frees nearly all of them by reference counting; at
# the default threshold (700 allocations) the cyclic collector took ~7 % of the engine's
# CPU (perf, bench/RESULTS.md §23).
GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect cycles less often, and never look again at what was built before the loop
    starts (modules, configuration): `gc.freeze` moves it out of the collected generations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the loop `loop_kind` names, with the collector tuned."""
    tune_gc()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
