"""structlog set-up: JSON lines on stderr by default. Log identifiers, never patient data."""

from __future__ import annotations

import ctypes
import logging
import sys

import structlog

__all__ = ["configure_logging", "name_process"]


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


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
