"""Channels: integrators' `routes/*.toml` files, validated, and their filters and transformers.

A channel says which messages it takes (source + filter), how to change them (transform)
and where they go (destinations). Files are data, checked once at load: an error names
the file, the key and what was expected. Evaluation is pure: no I/O, no protocol.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.er7 import Er7Error, Er7Message
from engine.er7_write import Er7Draft, TransformError
from engine.toml_files import describe_validation_error, read_toml

__all__ = [
    "Channel",
    "RouteError",
    "RouteInput",
    "RouteResult",
    "load_channel",
    "load_channels",
    "ordering_key",
]


class RouteError(Exception):
    """A channel file is invalid; the message names the file, the key and the expectation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


StrList = str | list[str]


def _as_list(value: StrList | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class FilterNode(_Strict):
    """One test, or a combination (`all`, `any`, `not`). Exactly one kind per node."""

    message_type: StrList | None = Field(None, description="'ADT', 'ADT^A01', 'ADT^A0*'")
    sender: StrList | None = Field(None, description="'APP|FACILITY' patterns, '*' wildcard")
    listener: StrList | None = None
    identifier_authority: StrList | None = Field(None, description="PID-3 authority OID or name")
    field: str | None = Field(None, description="terse path: PID-3.4.2, ZBE-4, OBX[2]-5, PID-3(*).5")
    metadata: str | None = Field(
        None, description="a key of the metadata read at the edge (any kind of submission): modality..."
    )
    equals: str | None = None
    not_equals: str | None = None
    one_of: list[str] | None = Field(None, alias="in")
    matches: str | None = Field(None, description="regular expression (Python syntax, full match)")
    exists: bool | None = None
    all: list[FilterNode] | None = None
    any: list[FilterNode] | None = None
    not_: FilterNode | None = Field(None, alias="not")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self) -> FilterNode:
        kinds = [
            k
            for k in (
                "message_type",
                "sender",
                "listener",
                "identifier_authority",
                "field",
                "metadata",
                "all",
                "any",
            )
            if getattr(self, k) is not None
        ]
        if self.not_ is not None:
            kinds.append("not")
        if len(kinds) != 1:
            raise ValueError(
                "a filter needs exactly one of message_type, sender, listener, identifier_authority, "
                f"field, metadata, all, any, not (got {kinds or 'none'})"
            )
        tests = [t for t in ("equals", "not_equals", "one_of", "matches", "exists") if getattr(self, t) is not None]
        valued = kinds in (["field"], ["metadata"])
        if valued and len(tests) != 1:
            raise ValueError(f"a {kinds[0]} filter needs exactly one of equals, not_equals, in, matches, exists")
        if not valued and tests:
            raise ValueError("equals/not_equals/in/matches/exists go with 'field' or 'metadata'")
        if self.matches is not None:
            re.compile(self.matches)
        return self


class Transform(_Strict):
    """One change: `set`+`value`, `copy`+`to`, `delete`, or `map`+`table`."""

    set: str | None = None
    value: str | None = None
    copy_: str | None = Field(None, alias="copy")
    to: str | None = None
    delete: str | None = None
    map: str | None = None
    table: str | None = None
    on_missing: Literal["keep", "error", "default"] = "keep"
    default: str = ""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _shape(self) -> Transform:
        ops = [k for k in ("set", "copy_", "delete", "map") if getattr(self, k) is not None]
        if len(ops) != 1:
            raise ValueError("a transform needs exactly one of set, copy, delete, map")
        op = ops[0]
        if op == "set" and self.value is None:
            raise ValueError("'set' needs 'value'")
        if op == "copy_" and self.to is None:
            raise ValueError("'copy' needs 'to'")
        if op == "map" and self.table is None:
            raise ValueError("'map' needs 'table'")
        return self


class DestinationSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: str
    ordering_key: Literal["sender+patient", "sender", "patient", "none"] = "sender+patient"
    on_failure: Literal["block", "skip"] = "block"
    max_attempts: int = Field(10, ge=1)
    backoff_initial: float = Field(1.0, gt=0, description="seconds before the 2nd attempt")
    backoff_max: float = Field(300.0, gt=0)
    suspend_after: int = Field(
        5, ge=0, description="failed attempts in a row (any key) that suspend the destination; 0: never"
    )
    settings: dict[str, Any] = Field(default_factory=dict)


SourceKind = Literal["hl7", "dicom", "dicom-study", "mail", "document", "rest"]


class Source(_Strict):
    listeners: list[str] = Field(default_factory=list, description="empty: every listener")
    kinds: list[SourceKind] = Field(default=["hl7"])


class RouteTest(_Strict):
    name: str = ""
    input: Path | None = Field(None, description="the HL7 message file (kind hl7)")
    listener: str = "mllp"
    kind: SourceKind = "hl7"
    metadata: dict[str, Any] = Field(default_factory=dict, description="other kinds: the item's metadata")
    expect_destinations: list[str] = Field(default_factory=list)
    expect_fields: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _input_for_hl7(self) -> RouteTest:
        if self.kind == "hl7" and (self.input is None or self.metadata):
            raise ValueError("an HL7 test gives 'input' (a message file), not 'metadata'")
        if self.kind != "hl7" and (self.input is not None or self.expect_fields):
            raise ValueError(f"a {self.kind} test gives 'metadata', not 'input' or 'expect_fields'")
        return self


class ChannelFile(_Strict):
    name: str | None = None
    description: str = ""
    enabled: bool = True
    source: Source = Field(default_factory=Source)
    filter: FilterNode | None = None
    tables: dict[str, dict[str, str]] = Field(default_factory=dict)
    transform: list[Transform] = Field(default_factory=list)
    destination: list[DestinationSpec] = Field(min_length=1)
    test: list[RouteTest] = Field(default_factory=list)

    @field_validator("destination")
    @classmethod
    def _unique(cls, v: list[DestinationSpec]) -> list[DestinationSpec]:
        names = [d.name for d in v]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique in a channel (got {names})")
        return v

    @model_validator(mode="after")
    def _tables_exist(self) -> ChannelFile:
        for i, t in enumerate(self.transform):
            if t.map is not None and t.table not in self.tables:
                raise ValueError(f"transform[{i}]: table {t.table!r} is not defined under [tables]")
        if self.transform and "hl7" not in self.source.kinds:
            # Mails, documents, REST submissions and studies are delivered as received.
            raise ValueError(
                f"transform: [[transform]] changes HL7 v2 fields, but source.kinds {self.source.kinds} "
                "takes no HL7 message; remove the transforms or add 'hl7' to source.kinds"
            )
        return self


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What a channel looks at: the parsed message, its metadata and where it came from."""

    message: Er7Message
    metadata: dict[str, Any]
    listener: str
    kind: str = "hl7"


@dataclass(frozen=True, slots=True)
class RouteResult:
    matched: bool
    reason: str  # why not, when not matched
    payload: bytes = b""  # the transformed message
    text: str = ""


@dataclass(frozen=True)
class Channel:
    name: str
    path: Path
    spec: ChannelFile

    @property
    def destinations(self) -> list[DestinationSpec]:
        return list(self.spec.destination)

    def route(self, item: RouteInput, encoding: str = "utf-8") -> RouteResult:
        """Filter then transform one message; never raises for a message, only says why."""
        spec = self.spec
        if not spec.enabled:
            return RouteResult(False, "channel disabled")
        if item.kind not in spec.source.kinds:
            return RouteResult(False, f"source kind {item.kind!r} not taken")
        if spec.source.listeners and item.listener not in spec.source.listeners:
            return RouteResult(False, f"listener {item.listener!r} not a source")
        if spec.filter is not None:
            ok, why = _evaluate(spec.filter, item, "filter")
            if not ok:
                return RouteResult(False, why)
        try:
            text = self._transform(item.message)
        except TransformError as e:
            return RouteResult(False, f"transform failed: {e}")
        return RouteResult(True, "", text.encode(encoding, errors="replace"), text)

    def _transform(self, message: Er7Message) -> str:
        if not self.spec.transform:
            return "\r".join(message.segments) + "\r"
        draft = Er7Draft.from_message(message)
        for i, t in enumerate(self.spec.transform):
            where = f"transform[{i}]"
            if t.set is not None:
                draft.set(t.set, t.value or "")
            elif t.copy_ is not None:
                draft.copy(t.copy_, t.to or "")
            elif t.delete is not None:
                draft.delete(t.delete)
            elif t.map is not None:
                table = self.spec.tables[t.table or ""]

                def lookup(old: str, t: Transform = t, table: dict[str, str] = table, where: str = where) -> str | None:
                    if not old:
                        return None
                    if old in table:
                        return table[old]
                    if t.on_missing == "error":
                        raise TransformError(f"{where}: no mapping for a value of {t.map}")
                    return t.default if t.on_missing == "default" else None

                draft.update(t.map, lookup, create=False)
        return draft.to_text()


def _matches_any(value: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _evaluate(node: FilterNode, item: RouteInput, where: str) -> tuple[bool, str]:
    meta = item.metadata
    if node.all is not None:
        for i, child in enumerate(node.all):
            ok, why = _evaluate(child, item, f"{where}.all[{i}]")
            if not ok:
                return False, why
        return True, ""
    if node.any is not None:
        reasons = []
        for i, child in enumerate(node.any):
            ok, why = _evaluate(child, item, f"{where}.any[{i}]")
            if ok:
                return True, ""
            reasons.append(why)
        return False, f"{where}.any: none matched"
    if node.not_ is not None:
        ok, _ = _evaluate(node.not_, item, f"{where}.not")
        return (not ok, "" if not ok else f"{where}.not: matched")
    if node.message_type is not None:
        mtype = f"{meta.get('message_type', '')}^{meta.get('trigger_event', '')}"
        patterns = [p if "^" in p else f"{p}^*" for p in _as_list(node.message_type)]
        return _verdict(_matches_any(mtype, patterns), where, f"message type {mtype} not in {patterns}")
    if node.sender is not None:
        sender = f"{meta.get('sending_application', '')}|{meta.get('sending_facility', '')}"
        return _verdict(_matches_any(sender, _as_list(node.sender)), where, f"sender {sender} not matched")
    if node.listener is not None:
        return _verdict(item.listener in _as_list(node.listener), where, f"listener {item.listener}")
    if node.identifier_authority is not None:
        wanted = set(_as_list(node.identifier_authority))
        ids = meta.get("patient_identifiers", [])
        found = any(i.get("authority_oid") in wanted or i.get("authority") in wanted for i in ids)
        return _verdict(found, where, "no patient identifier from that authority")
    if node.metadata is not None:
        raw = meta.get(node.metadata)
        items = raw if isinstance(raw, list) else [raw]
        values = [str(x) for x in items if x not in (None, "")]
        label = f"{where} (metadata {node.metadata})"
    else:
        assert node.field is not None
        values = _field_values(item.message, node.field)
        label = f"{where} ({node.field})"
    if node.exists is not None:
        return _verdict(bool(values) == node.exists, label, "present" if values else "absent")
    if node.equals is not None:
        return _verdict(node.equals in values, label, "value differs")
    if node.not_equals is not None:
        return _verdict(node.not_equals not in values, label, "value equals the excluded one")
    if node.one_of is not None:
        return _verdict(bool(set(values) & set(node.one_of)), label, "value not in the list")
    assert node.matches is not None
    rx = re.compile(node.matches)
    return _verdict(any(rx.fullmatch(v) for v in values), label, "no value matches")


def _verdict(ok: bool, where: str, why: str) -> tuple[bool, str]:
    return (True, "") if ok else (False, f"{where}: {why}")


def _field_values(message: Er7Message, path: str) -> list[str]:
    """Non-empty values at a path; `(*)`/`[*]` give every repetition/occurrence."""
    if "*" in path:
        return [v for v in Er7Draft.from_message(message).get(path) if v]
    value = message.get(path)
    return [value] if value else []


def ordering_key(kind: str, metadata: dict[str, Any]) -> str:
    """The key that keeps order per destination: sending facility and/or patient."""
    if kind == "none":
        return ""
    sender = f"{metadata.get('sending_application', '')}|{metadata.get('sending_facility', '')}"
    ids = metadata.get("patient_identifiers") or []
    local = next((i for i in ids if i.get("type") == "PI"), ids[0] if ids else None)
    patient = f"{local['id']}@{local.get('authority_oid') or local.get('authority', '')}" if local else ""
    if kind == "sender":
        return sender
    if kind == "patient":
        return patient
    return f"{sender}/{patient}"


def load_channel(path: Path) -> Channel:
    raw = read_toml(path, RouteError, "channel file")
    try:
        spec = ChannelFile.model_validate(raw)
    except ValidationError as e:
        raise RouteError(describe_validation_error(e, path)) from e
    import engine.identity_feed  # noqa: F401  (registers the "identity" destination kind)
    from connectors.registry import validate_settings

    for i, dest in enumerate(spec.destination):
        try:
            validate_settings(dest.type, dest.settings, path.parent)
        except ValueError as e:
            raise RouteError(f"{path}: destination[{i}] ({dest.name}): {e}") from e
    for i, test in enumerate(spec.test):
        if test.input is not None and not (path.parent / test.input).is_file():
            raise RouteError(f"{path}: test[{i}].input: no such file {test.input}")
    return Channel(spec.name or path.stem, path, spec)


def load_channels(folder: Path) -> list[Channel]:
    """Every `*.toml` in the folder, sorted by file name; all errors are reported at once."""
    channels, errors = [], []
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        try:
            channels.append(load_channel(path))
        except RouteError as e:
            errors.append(str(e))
    names = [c.name for c in channels]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        errors.append(f"{folder}: channel names must be unique (twice: {sorted(duplicated)})")
    if errors:
        raise RouteError("\n".join(errors))
    return channels


def parse_for_routing(raw: bytes, metadata: dict[str, Any]) -> Er7Message | None:
    """The stored bytes read again with the codec the intake used."""
    try:
        return Er7Message.parse(raw.decode(metadata.get("decoded_as") or "utf-8", errors="replace"))
    except Er7Error:
        return None
