"""The `relais` command: run the engine, look at stored messages, verify the log.

relais run --config config.toml
relais messages list --type ADT^A01 --patient 260058815400233 --json
relais messages show <message-id>
relais verify        # hash chain
relais check         # payloads: events without payload (never), orphan blobs
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson

from engine.config import ConfigError, RelaisConfig, load_config
from engine.logs import configure_logging
from event_store import EventStore

__all__ = ["main"]


def _open_store(config: RelaisConfig) -> EventStore:
    return EventStore.open(
        config.store_url,
        config.resolve(config.store.blob_dir),
        config.store.inline_payload_limit,
        config.store.lock_timeout,
    )


def _cmd_run(config: RelaisConfig, _: argparse.Namespace) -> int:
    from engine.app import RelaisApp

    configure_logging(config.log.level, config.log.format)
    asyncio.run(RelaisApp(config).run_until_signalled())
    return 0


def list_messages(store: EventStore, args: argparse.Namespace) -> list[dict[str, Any]]:
    where, params = [], []
    if args.type:
        mtype, _, trigger = args.type.partition("^")
        where.append("m.message_type = ?")
        params.append(mtype)
        if trigger:
            where.append("m.trigger_event = ?")
            params.append(trigger)
    if args.sender:
        where.append("m.sender LIKE ?" if "|" not in args.sender else "m.sender = ?")
        params.append(f"{args.sender}|%" if "|" not in args.sender else args.sender)
    if args.patient:
        where.append("m.message_id IN (SELECT message_id FROM relais_identifiers WHERE value = ?)")
        params.append(args.patient)
    if args.since:
        where.append("m.received_at >= ?")
        params.append(args.since)
    if args.until:
        where.append("m.received_at < ?")
        params.append(args.until)
    if args.status:
        where.append("m.status = ?")
        params.append(args.status)
    sql = "SELECT * FROM relais_messages m"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY m.received_at DESC LIMIT ?"
    params.append(args.limit)
    return store.query(sql, params)


def _cmd_list(config: RelaisConfig, args: argparse.Namespace) -> int:
    store = _open_store(config)
    try:
        rows = list_messages(store, args)
    finally:
        store.close()
    for row in rows:
        item = {
            "id": row["message_id"],
            "received_at": row["received_at"],
            "listener": row["listener"],
            "sender": row["sender"],
            "control_id": row["control_id"],
            "message_type": f"{row['message_type']}^{row['trigger_event']}".strip("^"),
            "status": row["status"],
            "ack_code": row["ack_code"],
        }
        if args.json:
            sys.stdout.write(orjson.dumps(item).decode() + "\n")
        else:
            print(
                f"{item['id']}  {item['received_at'][:23]}  {item['message_type']:<9} "
                f"{item['sender']:<28} {item['control_id']:<20} {item['ack_code']}"
            )
    if not args.json and not rows:
        print("no message matches", file=sys.stderr)
    return 0


def _cmd_show(config: RelaisConfig, args: argparse.Namespace) -> int:
    try:
        message_id = UUID(args.message_id)
    except ValueError:
        print(f"not a message id: {args.message_id!r}", file=sys.stderr)
        return 2
    store = _open_store(config)
    try:
        events = store.events_of(message_id)
        if not events:
            print(f"no message {message_id}", file=sys.stderr)
            return 1
        first = events[0].event
        payload_ref = first.get("payload") or {}
        payload = store.payload(payload_ref["sha256"]) if payload_ref else b""
    finally:
        store.close()
    if args.json:
        out = {
            "id": str(message_id),
            "metadata": first.get("metadata", {}),
            "events": [
                {"version": e.version, "type": e.topic.removeprefix("relais."), **e.event} for e in events
            ],
            "payload": payload.decode("latin-1"),
        }
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"message {message_id}")
    for key, value in first.get("metadata", {}).items():
        print(f"  {key}: {value}")
    print("events:")
    for e in events:
        detail = {k: v for k, v in e.event.items() if k not in ("metadata", "payload")}
        print(f"  {e.version} {e.topic.removeprefix('relais.')} {orjson.dumps(detail).decode()}")
    print(f"payload ({payload_ref.get('size')} bytes, sha256 {payload_ref.get('sha256')}):")
    print(
        payload.decode(first.get("metadata", {}).get("decoded_as") or "latin-1", errors="replace").replace(
            "\r", "\n"
        )
    )
    return 0


def _cmd_verify(config: RelaisConfig, _: argparse.Namespace) -> int:
    store = _open_store(config)
    try:
        report = store.verify_chain()
    finally:
        store.close()
    print(f"events: {report.events}\nhead: {report.head}")
    for problem in report.problems:
        print(f"BROKEN: {problem}")
    print("chain ok" if report.ok else "chain BROKEN")
    return 0 if report.ok else 1


def _cmd_check(config: RelaisConfig, _: argparse.Namespace) -> int:
    from event_store.integrity import check_payloads

    store = _open_store(config)
    try:
        report = check_payloads(store)
    finally:
        store.close()
    print(f"payloads referenced: {report.referenced}")
    print(f"missing payloads (events whose bytes are gone): {len(report.missing)}")
    for sha in report.missing:
        print(f"  MISSING {sha}")
    print(f"orphan blobs (bytes with no event, harmless): {len(report.orphans)}")
    for sha in report.orphans:
        print(f"  orphan {sha}")
    print(
        f"incomplete blob writes (left by a killed writer, removed at next start): {len(report.incomplete)}"
    )
    for name in report.incomplete:
        print(f"  incomplete {name}")
    return 1 if report.missing else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relais", description="Relais regional e-health message bus")
    p.add_argument("--config", type=Path, default=Path("config.toml"), help="default: ./config.toml")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the engine on the configured listeners")
    run.set_defaults(func=_cmd_run)
    messages = sub.add_parser("messages", help="stored messages").add_subparsers(dest="what", required=True)
    ls = messages.add_parser("list", help="newest first")
    ls.add_argument("--type", help="ADT or ADT^A01")
    ls.add_argument("--sender", help="APP or APP|FACILITY")
    ls.add_argument("--patient", help="any patient identifier value (IPP, INS...)")
    ls.add_argument("--since", help="ISO time, e.g. 2026-11-01 or 2026-11-01T08:00")
    ls.add_argument("--until", help="ISO time (exclusive)")
    ls.add_argument("--status", choices=["accepted", "error", "reject"])
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_cmd_list)
    show = messages.add_parser("show", help="metadata, events and raw payload of one message")
    show.add_argument("message_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_show)
    sub.add_parser("verify", help="check the hash chain of the whole log").set_defaults(func=_cmd_verify)
    sub.add_parser("check", help="check payloads: missing ones and orphan blobs").set_defaults(
        func=_cmd_check
    )
    for sp in (run, ls, show, *(sub.choices[c] for c in ("verify", "check"))):
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    return int(args.func(config, args))


if __name__ == "__main__":
    sys.exit(main())
