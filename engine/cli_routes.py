"""`relais routes ...`: check, test, dry-run and reload the channels of routes/ (engine/cli.py
holds the parser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import RelaisConfig

__all__ = ["cmd_routes_check", "cmd_routes_reload", "cmd_routes_test", "cmd_routes_try"]


def _routes_dir(config: RelaisConfig, args: argparse.Namespace) -> Path:
    return Path(args.routes) if getattr(args, "routes", None) else config.resolve(config.routing.routes_dir)


def cmd_routes_check(config: RelaisConfig, args: argparse.Namespace) -> int:
    from engine.routes import RouteError, load_channels

    folder = _routes_dir(config, args)
    try:
        channels = load_channels(folder)
    except RouteError as e:
        print(str(e), file=sys.stderr)
        return 1
    for c in channels:
        state = "" if c.spec.enabled else " (disabled)"
        dests = ", ".join(f"{d.name}:{d.type}" for d in c.destinations)
        print(f"{c.name}{state}: {c.path.name} -> {dests}")
    print(f"{len(channels)} channel(s) OK in {folder}")
    return 0


def cmd_routes_test(config: RelaisConfig, args: argparse.Namespace) -> int:
    from engine.route_tools import run_route_tests
    from engine.routes import RouteError, load_channels

    try:
        channels = load_channels(_routes_dir(config, args))
    except RouteError as e:
        print(str(e), file=sys.stderr)
        return 1
    outcomes = run_route_tests(channels)
    for o in outcomes:
        print(f"{'PASS' if o.ok else 'FAIL'}  {o.channel}: {o.name}")
        for problem in o.problems:
            print(f"      {problem}")
    failed = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_routes_try(config: RelaisConfig, args: argparse.Namespace) -> int:
    from engine.route_tools import describe_changes, dry_run
    from engine.routes import RouteError, load_channel

    try:
        channel = load_channel(Path(args.file))
    except RouteError as e:
        print(str(e), file=sys.stderr)
        return 1
    store = config.open_store()
    try:
        report = dry_run(store, channel, args.since, args.until, args.samples)
    finally:
        store.close()
    print(f"dry-run of channel {channel.name} ({args.file}) on messages since {args.since}: nothing was sent")
    print(f"messages examined: {report.examined}, routed: {report.routed}, not routed: "
          f"{report.examined - report.routed}")  # fmt: skip
    print("would deliver:")
    for dest, count in sorted(report.per_destination.items()):
        print(f"  {dest}: {count}")
    if report.misses:
        print("filter misses (first failing test):")
        for reason, count in report.misses.most_common(10):
            print(f"  {count:>6}  {reason}")
    for message_id, before, after in report.samples:
        print(f"sample {message_id}:")
        print("\n".join(describe_changes(before, after)) or "  (unchanged)")
    return 0


def cmd_routes_reload(config: RelaisConfig, args: argparse.Namespace) -> int:
    import os
    import signal

    pidfile = config.resolve(config.store.blob_dir).parent / "relais.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        print(f"no running engine found ({pidfile})", file=sys.stderr)
        return 1
    print(f"asked the engine (pid {pid}) to reload its routes; see its log for the outcome")
    return 0
