"""The `relais` command: run the engine, look at stored messages, verify the log.

relais run --config config.toml
relais messages list --type ADT^A01 --patient 260058815400233 --json
relais messages show <message-id>
relais verify        # hash chain
relais check         # payloads: events without payload (never), orphan blobs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson

from engine import loop as event_loop
from engine.cli_identity import cmd_identity_duplicates, cmd_identity_show
from engine.cli_routes import cmd_routes_check, cmd_routes_reload, cmd_routes_test, cmd_routes_try
from engine.config import ConfigError, RelaisConfig, load_config
from engine.logs import configure_logging
from event_store import EventStore

__all__ = ["main"]


def _open_store(config: RelaisConfig) -> EventStore:
    return config.open_store()


def _cmd_run(config: RelaisConfig, _: argparse.Namespace) -> int:
    from engine.app import RelaisApp
    from engine.routes import RouteError
    from event_store.writer_lock import StoreBusy

    configure_logging(config.log.level, config.log.format)
    try:
        event_loop.loop_kind()
    except ValueError as e:
        print(f"relais: not started: {e}", file=sys.stderr)
        return 1
    try:
        event_loop.run(RelaisApp(config).run_until_signalled())
    except (StoreBusy, RouteError) as e:
        print(f"relais: not started: {e}", file=sys.stderr)
        return 1
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
            "events": [{"version": e.version, "type": e.topic.removeprefix("relais."), **e.event} for e in events],
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
        payload.decode(first.get("metadata", {}).get("decoded_as") or "latin-1", errors="replace").replace("\r", "\n")
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
    print(f"incomplete blob writes (left by a killed writer, removed at next start): {len(report.incomplete)}")
    for name in report.incomplete:
        print(f"  incomplete {name}")
    return 1 if report.missing else 0


def _cmd_status(config: RelaisConfig, args: argparse.Namespace) -> int:
    """What an operator checks first: volumes, follower lag, outbox per destination."""
    store = _open_store(config)
    try:
        head = store.recorder.max_notification_id() or 0
        messages = store.query(
            "SELECT status, COUNT(*) AS n, MAX(received_at) AS last FROM relais_messages GROUP BY status"
        )
        followers = store.query("SELECT name, position FROM relais_tracking ORDER BY name")
        outbox = store.query(
            "SELECT channel, destination, state, COUNT(*) AS n FROM relais_outbox "
            "GROUP BY channel, destination, state ORDER BY channel, destination, state"
        )
        failing = _failing_destinations(store)
    finally:
        store.close()
    by_status = {r["status"]: {"count": r["n"], "last_received_at": r["last"]} for r in messages}
    lag = {r["name"]: {"position": r["position"], "behind": head - r["position"]} for r in followers}
    status: dict[str, Any] = {
        "log_position": head, "messages": by_status, "followers": lag, "outbox": outbox, "failing": failing,
    }  # fmt: skip
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"log position: {head}")
    for name, info in by_status.items():
        print(f"messages {name}: {info['count']} (last {info['last_received_at']})")
    for name, info in lag.items():
        print(f"follower {name}: at {info['position']}, {info['behind']} event(s) behind")
    for row in outbox:
        print(f"outbox {row['channel']}/{row['destination']} {row['state']}: {row['n']}")
    for f in failing:
        print(f"failing {f['channel']}/{f['destination']}: {f['deliveries']} pending delivery(ies) failed their "
              f"last attempt, the latest at {f['last_failed_at']}: {f['last_error']} "
              f"(next attempt from {f['next_attempt_at']})")  # fmt: skip
    return 0


def _failing_destinations(store: EventStore) -> list[dict[str, Any]]:
    """Destinations with pending deliveries whose last attempt failed: the partner that is
    down shows here with its last error, even while its other deliveries wait untried
    (suspended, README: Routing)."""
    rows = store.query(
        "SELECT channel, destination, COUNT(*) AS n, MAX(updated_at) AS last, MIN(next_attempt_at) AS next, "
        "(SELECT last_error FROM relais_outbox l WHERE l.channel = o.channel AND l.destination = o.destination "
        " AND l.state = 'pending' AND l.attempts > 0 ORDER BY l.updated_at DESC LIMIT 1) AS last_error "
        "FROM relais_outbox o WHERE state = 'pending' AND attempts > 0 "
        "GROUP BY channel, destination ORDER BY channel, destination"
    )
    return [
        {"channel": r["channel"], "destination": r["destination"], "deliveries": r["n"],
         "last_failed_at": r["last"], "next_attempt_at": r["next"], "last_error": r["last_error"] or ""}
        for r in rows
    ]  # fmt: skip


def _cmd_deadletters(config: RelaisConfig, args: argparse.Namespace) -> int:
    store = _open_store(config)
    try:
        rows = store.query(
            "SELECT delivery_id, message_id, channel, destination, attempts, last_error, updated_at, blocks "
            "FROM relais_outbox WHERE state = 'dead' ORDER BY seq LIMIT ?",
            [args.limit],
        )
    finally:
        store.close()
    for r in rows:
        if args.json:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        else:
            held = " (holds its key)" if r["blocks"] else ""
            print(f"{r['message_id']}  {r['channel']}/{r['destination']}  attempts={r['attempts']}{held}  "
                  f"{r['updated_at'][:19]}  {r['last_error']}")  # fmt: skip
    if not rows and not args.json:
        print("no dead letters", file=sys.stderr)
    return 0


def _cmd_redeliver(config: RelaisConfig, args: argparse.Namespace) -> int:
    import getpass
    import uuid as uuid_mod
    from datetime import UTC, datetime

    if bool(args.message_id) == bool(args.channel):
        print("give either a message id or --channel NAME --since TIME", file=sys.stderr)
        return 2
    if args.channel and not args.since:
        print("--channel needs --since (ISO time)", file=sys.stderr)
        return 2
    target = {"message_id": args.message_id} if args.message_id else {"channel": args.channel, "since": args.since}
    store = _open_store(config)
    try:
        if args.message_id and not store.query(
            "SELECT 1 AS x FROM relais_outbox WHERE message_id = ?", [args.message_id]
        ):
            print(f"message {args.message_id} has no delivery", file=sys.stderr)
            return 1
        request_id = str(uuid_mod.uuid4())
        store.execute(
            "INSERT INTO relais_requests VALUES (?,?,?,?,?,?,NULL,NULL)",
            [request_id, "redeliver", orjson.dumps(target).decode(), args.by or getpass.getuser(),
             args.reason, datetime.now(UTC).isoformat(timespec="microseconds")],
        )  # fmt: skip
    finally:
        store.close()
    print(f"redelivery request {request_id} queued; the running engine records it as Redelivered events")
    return 0


def _cmd_hash_password(config: RelaisConfig | None, args: argparse.Namespace) -> int:
    """`password_hash` for `[[listeners.smtp]] accounts`; the password comes from a prompt or stdin."""
    import getpass

    from connectors.smtp import hash_password

    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


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
    sub.add_parser("check", help="check payloads: missing ones and orphan blobs").set_defaults(func=_cmd_check)
    st = sub.add_parser("status", help="volumes, follower lag, outbox per destination, failing destinations")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    routes = sub.add_parser("routes", help="channels in routes/").add_subparsers(dest="what", required=True)
    rc = routes.add_parser("check", help="validate every channel file without starting anything")
    rc.set_defaults(func=cmd_routes_check)
    rt = routes.add_parser("test", help="run the [[test]] cases of every channel")
    rt.set_defaults(func=cmd_routes_test)
    for sp in (rc, rt):
        sp.add_argument("--routes", help="folder of channel files (default: from the config)")
    rtry = routes.add_parser("try", help="dry-run a channel file against stored messages; sends nothing")
    rtry.add_argument("file")
    rtry.add_argument("--since", required=True, help="ISO time, e.g. 2026-11-01")
    rtry.add_argument("--until")
    rtry.add_argument("--samples", type=int, default=3)
    rtry.set_defaults(func=cmd_routes_try)
    rr = routes.add_parser("reload", help="ask the running engine to reload routes/ (SIGHUP)")
    rr.set_defaults(func=cmd_routes_reload)
    dl = sub.add_parser("deadletters", help="dead-lettered deliveries").add_subparsers(dest="what", required=True)
    dll = dl.add_parser("list")
    dll.add_argument("--limit", type=int, default=100)
    dll.add_argument("--json", action="store_true")
    dll.set_defaults(func=_cmd_deadletters)
    red = sub.add_parser("redeliver", help="deliver again: one message, or a channel since a time")
    red.add_argument("message_id", nargs="?")
    red.add_argument("--channel")
    red.add_argument("--since")
    red.add_argument("--by", help="who asks (default: the OS user)")
    red.add_argument("--reason", default="", help="why, kept in the Redelivered event")
    red.set_defaults(func=_cmd_redeliver)
    ident = sub.add_parser("identity", help="the regional identity read model").add_subparsers(
        dest="what", required=True
    )
    ids = ident.add_parser("show", help="an identity by any of its identifiers (IPP, INS, RRI)")
    ids.add_argument("identifier")
    ids.add_argument("--json", action="store_true")
    ids.set_defaults(func=cmd_identity_show)
    idd = ident.add_parser("duplicates", help="suspected duplicates for the identity team")
    idd.add_argument("--all", action="store_true", help="also those resolved by a merge")
    idd.add_argument("--json", action="store_true")
    idd.set_defaults(func=cmd_identity_duplicates)
    hp = sub.add_parser("hash-password", help="hash an SMTP account's password for config.toml (reads stdin)")
    hp.set_defaults(func=_cmd_hash_password)
    for sp in (
        run,
        ls,
        show,
        st,
        rc,
        rt,
        rtry,
        rr,
        dll,
        red,
        ids,
        idd,
        hp,
        *(sub.choices[c] for c in ("verify", "check")),
    ):
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.func is _cmd_hash_password:  # needs no configuration
        return _cmd_hash_password(None, args)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    return int(args.func(config, args))


if __name__ == "__main__":
    sys.exit(main())
