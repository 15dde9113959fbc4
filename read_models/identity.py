"""The regional identity read model: one regional identity (RRI) per patient, the local and
national identifiers linked to it, merges, and suspected duplicates for the identity team.

Fed by ADT messages (IHE PAM France ITI-30/31) that a channel sends to an `identity`
destination. Pure: `apply` turns what one message says about a patient, plus what the
model already holds (read through `Lookup`), into rows to write and the `IdentityUpdated`
facts to record; the engine commits both together.

Rules (STANDARDS.md):
- an INS (PID-3 type `INS`, authority OID 1.2.250.1.213.1.4.8/.9/.10/.11) is used only when
  PID-32 says `VALI`; otherwise it is ignored and the event says why;
- A47 changes an identifier (old in MRG-1, new in PID-3); A40 merges the patient in MRG-1
  into the one in PID-3 (the absorbed identity stays, marked merged, its identifiers move);
- a new or updated identity whose name, birth date and sex equal another's, without a
  shared identifier, is a suspected duplicate: recorded, never merged automatically.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "IDENTITY_TABLES",
    "INS_OIDS",
    "Ident",
    "IdentityChange",
    "IdentityError",
    "Lookup",
    "PatientFacts",
    "apply",
    "name_key",
]

INS_OIDS = frozenset({"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"})

IDENTITY_TABLES = [
    """CREATE TABLE IF NOT EXISTS relais_identity_persons (
        rri TEXT PRIMARY KEY, status TEXT NOT NULL, merged_into TEXT NOT NULL,
        family TEXT NOT NULL, given TEXT NOT NULL, birth_date TEXT NOT NULL, sex TEXT NOT NULL,
        reliability TEXT NOT NULL, ins TEXT NOT NULL, ins_oid TEXT NOT NULL, name_key TEXT NOT NULL,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, last_message_id TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_identity_persons_name ON relais_identity_persons (name_key)",
    """CREATE TABLE IF NOT EXISTS relais_identity_ids (
        authority TEXT NOT NULL, value TEXT NOT NULL, id_type TEXT NOT NULL, rri TEXT NOT NULL,
        linked_at TEXT NOT NULL, PRIMARY KEY (authority, value))""",
    "CREATE INDEX IF NOT EXISTS relais_identity_ids_rri ON relais_identity_ids (rri)",
    """CREATE TABLE IF NOT EXISTS relais_identity_duplicates (
        rri_a TEXT NOT NULL, rri_b TEXT NOT NULL, reason TEXT NOT NULL, detected_at TEXT NOT NULL,
        state TEXT NOT NULL, PRIMARY KEY (rri_a, rri_b))""",
    # Deliveries already applied: a redelivery after a crash changes nothing twice.
    """CREATE TABLE IF NOT EXISTS relais_identity_applied (
        delivery_id TEXT PRIMARY KEY, message_id TEXT NOT NULL, detail TEXT NOT NULL)""",
]

UPSERT_PERSON = (
    "INSERT INTO relais_identity_persons VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (rri) DO UPDATE SET "
    "status = excluded.status, merged_into = excluded.merged_into, family = excluded.family, "
    "given = excluded.given, birth_date = excluded.birth_date, sex = excluded.sex, "
    "reliability = excluded.reliability, ins = excluded.ins, ins_oid = excluded.ins_oid, "
    "name_key = excluded.name_key, updated_at = excluded.updated_at, last_message_id = excluded.last_message_id"
)
LINK_ID = (
    "INSERT INTO relais_identity_ids VALUES (?,?,?,?,?) ON CONFLICT (authority, value) DO UPDATE SET "
    "rri = excluded.rri, id_type = excluded.id_type, linked_at = excluded.linked_at"
)
UNLINK_ID = "DELETE FROM relais_identity_ids WHERE authority = ? AND value = ?"
MOVE_IDS = "UPDATE relais_identity_ids SET rri = ? WHERE rri = ?"
SUSPECT = "INSERT INTO relais_identity_duplicates VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING"
RESOLVE = "UPDATE relais_identity_duplicates SET state = ? WHERE rri_a = ? AND rri_b = ?"
APPLIED = "INSERT INTO relais_identity_applied VALUES (?,?,?)"


class IdentityError(Exception):
    """The message cannot be applied as it stands (unknown identifier to change, conflict)."""


@dataclass(frozen=True, slots=True)
class Ident:
    """One patient identifier: its assigning authority (OID when given, else namespace)."""

    authority: str
    value: str
    type: str = ""

    @property
    def is_ins(self) -> bool:
        return self.type == "INS" or self.authority in INS_OIDS

    def label(self) -> str:
        return f"{self.value}^{self.type}@{self.authority}"


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """What one ADT says about its patient (PID-3/5/7/8/32, MRG-1)."""

    trigger: str
    identifiers: list[Ident]
    previous: list[Ident] = field(default_factory=list)  # MRG-1
    family: str = ""
    given: str = ""
    birth_date: str = ""
    sex: str = ""
    reliability: str = ""


class Lookup(Protocol):
    """What `apply` reads from the model."""

    def owners(self, idents: list[Ident]) -> dict[Ident, str]:
        """The identity (RRI) each known identifier is linked to."""

    def person(self, rri: str) -> dict[str, Any] | None: ...

    def namesakes(self, key: str) -> list[str]:
        """Active identities whose name key (name, birth date, sex) is `key`."""


@dataclass
class IdentityChange:
    """Rows to write and the facts to record, from one message."""

    rri: str
    action: str  # created | updated | identifier_changed | merged
    detail: str
    statements: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)
    merged_from: str = ""
    suspected_duplicates: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def add(self, sql: str, *row: Any) -> None:
        for existing_sql, rows in self.statements:
            if existing_sql == sql:
                rows.append(tuple(row))
                return
        self.statements.append((sql, [tuple(row)]))


def name_key(family: str, given: str, birth_date: str, sex: str) -> str:
    """Name, birth date and sex folded (accents, case, punctuation) for duplicate detection."""

    def fold(text: str) -> str:
        plain = unicodedata.normalize("NFKD", text)
        return "".join(c for c in plain.casefold() if c.isalnum())

    if not (family and birth_date):
        return ""
    return f"{fold(family)}|{fold(given)}|{birth_date[:8]}|{sex.upper()}"


def apply(
    facts: PatientFacts, lookup: Lookup, *, message_id: str, now: str, new_rri: Callable[[], str]
) -> IdentityChange:
    """What the message changes in the model; IdentityError when it cannot be applied."""
    usable, ignored = _usable(facts)
    if facts.trigger == "A47":
        change = _change_identifier(facts, usable, lookup, message_id, now)
    elif facts.trigger == "A40":
        change = _merge(facts, usable, lookup, message_id, now, new_rri)
    else:
        change = _create_or_update(facts, usable, lookup, message_id, now, new_rri)
    change.ignored = ignored
    return change


def _usable(facts: PatientFacts) -> tuple[list[Ident], list[str]]:
    usable, ignored = [], []
    for ident in facts.identifiers:
        if ident.is_ins and facts.reliability != "VALI":
            ignored.append(f"INS ignored: identity reliability (PID-32) is {facts.reliability or 'empty'}, not VALI")
            continue
        usable.append(ident)
    if not usable:
        raise IdentityError("no usable patient identifier in PID-3")
    return usable, ignored


def _survivors(owners: dict[Ident, str], lookup: Lookup) -> dict[Ident, str]:
    """Owners with merged identities replaced by the identity they were merged into."""
    out = {}
    for ident, rri in owners.items():
        seen = set()
        person = lookup.person(rri)
        while person and person["status"] == "merged" and person["merged_into"] and rri not in seen:
            seen.add(rri)
            rri = person["merged_into"]
            person = lookup.person(rri)
        out[ident] = rri
    return out


def _person_row(rri: str, facts: PatientFacts, usable: list[Ident], before: dict[str, Any] | None,
                message_id: str, now: str) -> tuple[Any, ...]:  # fmt: skip
    ins = next((i for i in usable if i.is_ins), None)
    keep = before or {}
    family = facts.family or keep.get("family", "")
    given = facts.given or keep.get("given", "")
    birth = facts.birth_date or keep.get("birth_date", "")
    sex = facts.sex or keep.get("sex", "")
    reliability = facts.reliability or keep.get("reliability", "")
    return (
        rri, "active", "", family, given, birth, sex, reliability,
        ins.value if ins else keep.get("ins", ""), ins.authority if ins else keep.get("ins_oid", ""),
        name_key(family, given, birth, sex), keep.get("created_at", now), now, message_id,
    )  # fmt: skip


def _suspect(change: IdentityChange, rri: str, key: str, lookup: Lookup, now: str, reason: str) -> None:
    if not key:
        return
    for other in lookup.namesakes(key):
        if other != rri:
            a, b = sorted((rri, other))
            change.add(SUSPECT, a, b, reason, now, "open")
            change.suspected_duplicates.append(other)


def _create_or_update(facts: PatientFacts, usable: list[Ident], lookup: Lookup, message_id: str, now: str,
                      new_rri: Callable[[], str]) -> IdentityChange:  # fmt: skip
    owners = _survivors(lookup.owners(usable), lookup)
    found = list(dict.fromkeys(owners.values()))
    rri = found[0] if found else new_rri()
    before = lookup.person(rri) if found else None
    change = IdentityChange(rri, "updated" if found else "created", "")
    row = _person_row(rri, facts, usable, before, message_id, now)
    change.add(UPSERT_PERSON, *row)
    for ident in usable:
        if ident not in owners:
            change.add(LINK_ID, ident.authority, ident.value, ident.type, rri, now)
            change.linked.append(ident.label())
    for other in found[1:]:
        # One message's identifiers point at several identities: flag them, do not merge.
        a, b = sorted((rri, other))
        change.add(SUSPECT, a, b, "identifiers of one message belong to both identities", now, "open")
        change.suspected_duplicates.append(other)
    if change.action == "created" or (before and before["name_key"] != row[10]):
        _suspect(change, rri, row[10], lookup, now, "same name, birth date and sex")
    change.detail = f"identity {rri} {change.action}" + (
        f", {len(change.suspected_duplicates)} suspected duplicate(s)" if change.suspected_duplicates else ""
    )
    return change


def _change_identifier(facts: PatientFacts, usable: list[Ident], lookup: Lookup, message_id: str,
                       now: str) -> IdentityChange:  # fmt: skip
    if not facts.previous:
        raise IdentityError("A47 without MRG-1: no identifier to change")
    old_owners = _survivors(lookup.owners(facts.previous), lookup)
    unknown = [i.label() for i in facts.previous if i not in old_owners]
    if unknown:
        raise IdentityError(f"A47: identifier to change is unknown ({len(unknown)} in MRG-1)")
    rris = set(old_owners.values())
    if len(rris) > 1:
        raise IdentityError("A47: the identifiers in MRG-1 belong to different identities")
    rri = rris.pop()
    taken = {i: r for i, r in _survivors(lookup.owners(usable), lookup).items() if r != rri}
    if taken:
        raise IdentityError("A47: the new identifier already belongs to another identity (an A40 merge is needed)")
    change = IdentityChange(rri, "identifier_changed", f"identity {rri}: identifier changed")
    for ident in facts.previous:
        change.add(UNLINK_ID, ident.authority, ident.value)
        change.unlinked.append(ident.label())
    for ident in usable:
        change.add(LINK_ID, ident.authority, ident.value, ident.type, rri, now)
        change.linked.append(ident.label())
    change.add(UPSERT_PERSON, *_person_row(rri, facts, usable, lookup.person(rri), message_id, now))
    return change


def _merge(facts: PatientFacts, usable: list[Ident], lookup: Lookup, message_id: str, now: str,
           new_rri: Callable[[], str]) -> IdentityChange:  # fmt: skip
    if not facts.previous:
        raise IdentityError("A40 without MRG-1: no patient to merge")
    change = _create_or_update(facts, usable, lookup, message_id, now, new_rri)
    survivor = change.rri
    absorbed = set(_survivors(lookup.owners(facts.previous), lookup).values()) - {survivor}
    change.action = "merged"
    for rri in sorted(absorbed):
        person = lookup.person(rri) or {}
        change.add(UPSERT_PERSON, rri, "merged", survivor, person.get("family", ""), person.get("given", ""),
                   person.get("birth_date", ""), person.get("sex", ""), person.get("reliability", ""),
                   person.get("ins", ""), person.get("ins_oid", ""), person.get("name_key", ""),
                   person.get("created_at", now), now, message_id)  # fmt: skip
        change.add(MOVE_IDS, survivor, rri)
        a, b = sorted((survivor, rri))
        change.add(RESOLVE, "merged", a, b)
        change.merged_from = rri
    # Identifiers of the absorbed patient nobody knew yet now point at the survivor.
    known = lookup.owners(facts.previous)
    for ident in facts.previous:
        if ident not in known:
            change.add(LINK_ID, ident.authority, ident.value, ident.type, survivor, now)
            change.linked.append(ident.label())
    change.suspected_duplicates = [r for r in change.suspected_duplicates if r not in absorbed]
    change.detail = (
        f"identity {change.merged_from} merged into {survivor}" if change.merged_from
        else f"identity {survivor}: merge of an unknown patient, its identifiers linked"
    )  # fmt: skip
    return change
