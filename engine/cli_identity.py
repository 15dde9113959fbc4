"""`relais identity ...`: the regional identity read model for the identity team (engine/cli.py
holds the parser)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from engine.config import RelaisConfig
from event_store import EventStore

__all__ = ["cmd_identity_duplicates", "cmd_identity_show"]


def _identity_query(store: EventStore, sql: str, params: list[Any]) -> list[dict[str, Any]] | None:
    """Rows of the identity read model; None when the engine never created it."""
    try:
        return store.query(sql, params)
    except Exception as e:
        if "relais_identity" in str(e):
            return None
        raise


def cmd_identity_show(config: RelaisConfig, args: argparse.Namespace) -> int:
    store = config.open_store()
    try:
        found = _identity_query(
            store, "SELECT rri FROM relais_identity_ids WHERE value = ? UNION SELECT rri FROM relais_identity_persons "
            "WHERE rri = ?", [args.identifier, args.identifier],
        )  # fmt: skip
        if found is None:
            print("no identity read model in this store (no identity channel has run)", file=sys.stderr)
            return 1
        out = []
        for rri in sorted({r["rri"] for r in found}):
            person = store.query("SELECT * FROM relais_identity_persons WHERE rri = ?", [rri])[0]
            person["identifiers"] = store.query(
                "SELECT value, id_type, authority, linked_at FROM relais_identity_ids WHERE rri = ? ORDER BY linked_at",
                [rri],
            )
            person["merged"] = [
                r["rri"] for r in store.query("SELECT rri FROM relais_identity_persons WHERE merged_into = ?", [rri])
            ]
            person["suspected_duplicates"] = store.query(
                "SELECT rri_a, rri_b, reason, detected_at, state FROM relais_identity_duplicates "
                "WHERE rri_a = ? OR rri_b = ?", [rri, rri],
            )  # fmt: skip
            out.append(person)
    finally:
        store.close()
    if not out:
        print(f"no identity with identifier {args.identifier!r}", file=sys.stderr)
        return 1
    for p in out:
        if args.json:
            sys.stdout.write(orjson.dumps(p).decode() + "\n")
            continue
        merged = f" -> merged into {p['merged_into']}" if p["status"] == "merged" else ""
        print(f"{p['rri']}  {p['status']}{merged}")
        print(f"  {p['family']} {p['given']}  born {p['birth_date']}  sex {p['sex']}  reliability {p['reliability']}")
        if p["ins"]:
            print(f"  INS {p['ins']} ({p['ins_oid']})")
        for i in p["identifiers"]:
            print(f"  id {i['value']}  type {i['id_type'] or '-'}  authority {i['authority']}")
        for rri in p["merged"]:
            print(f"  absorbed {rri}")
        for d in p["suspected_duplicates"]:
            other = d["rri_b"] if d["rri_a"] == p["rri"] else d["rri_a"]
            print(f"  suspected duplicate of {other} ({d['state']}): {d['reason']}")
    return 0


def cmd_identity_duplicates(config: RelaisConfig, args: argparse.Namespace) -> int:
    store = config.open_store()
    try:
        state = "%" if args.all else "open"
        rows = _identity_query(
            store, "SELECT rri_a, rri_b, reason, detected_at, state FROM relais_identity_duplicates "
            "WHERE state LIKE ? ORDER BY detected_at", [state],
        )  # fmt: skip
    finally:
        store.close()
    if rows is None:
        print("no identity read model in this store (no identity channel has run)", file=sys.stderr)
        return 1
    for r in rows:
        if args.json:
            sys.stdout.write(orjson.dumps(r).decode() + "\n")
        else:
            print(f"{r['rri_a']}  {r['rri_b']}  {r['state']}  {r['detected_at'][:19]}  {r['reason']}")
    if not rows and not args.json:
        print("no suspected duplicates", file=sys.stderr)
    return 0
