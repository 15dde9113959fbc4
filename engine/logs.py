"""structlog set-up: JSON lines on stderr by default. Log identifiers, never patient data."""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog

__all__ = ["configure_logging", "name_process"]


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """JSON lines rendered by orjson and written as bytes, each flushed whole as written.

    At the default level a routed message costs a line on intake and one per delivery: with
    the standard library's encoder and a text stream a line took 11-15 µs, now 7
    (bench/RESULTS.md §29)."""
    # Bytes straight to stderr's file; a stderr without one (replaced by a test harness,
    # say) gets text as before.
    stream = getattr(sys.stderr, "buffer", None)
    renderer: structlog.types.Processor
    factory: Callable[..., Any]
    if fmt != "json":
        renderer, factory = structlog.dev.ConsoleRenderer(), structlog.PrintLoggerFactory(file=sys.stderr)
    elif stream is None:
        renderer, factory = structlog.processors.JSONRenderer(), structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory = structlog.BytesLoggerFactory(file=stream)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _dumps(obj: Any, **kw: Any) -> bytes:
    """orjson, or the standard library for what orjson refuses (an int past 64 bits, a dict
    with other keys than strings): a log call never fails for what it was given."""
    try:
        return orjson.dumps(obj, **kw)
    except TypeError:
        return json.dumps(obj, default=repr).encode()


def name_process(name: str) -> None:
    """Show this process as `name` (15 characters at most) in ps, top and /proc/PID/comm, so an
    operator can tell the router, writer and acceptor processes apart (Linux; elsewhere, and
    if it fails, nothing changes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
