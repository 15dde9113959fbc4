"""Editing an ER7 message for route transformers: set, copy, delete and map field values.

Works on the raw text so everything not touched stays byte-for-byte as received (hl7apy
would re-serialise the whole message and drop a trailing Z-segment).

    >>> draft = Er7Draft.from_message(Er7Message.parse(text))
    >>> draft.set("MSH-5", "PARTNER"); draft.to_text()
"""

from __future__ import annotations

import re
from collections.abc import Callable

from engine.ack import escape
from engine.er7 import Er7Message, Separators, unescape

__all__ = ["Er7Draft", "TransformError"]

_WRITE_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+|\*)\])?-(?P<field>\d+)"
    r"(?:\((?P<rep>\d+|\*)\))?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$"
)


class TransformError(ValueError):
    """A transformer could not apply (bad path, missing mapping with on_missing='error')."""


class Er7Draft:
    """A mutable copy of a message: segments as lists of escaped fields."""

    def __init__(self, segments: list[list[str]], separators: Separators) -> None:
        self.segments = segments
        self.seps = separators

    @classmethod
    def from_message(cls, message: Er7Message) -> Er7Draft:
        seps = message.separators
        segments = []
        for seg in message.segments:
            fields = seg.split(seps.field)
            if fields[0] == "MSH":
                fields.insert(1, seps.field)
            segments.append(fields)
        return cls(segments, seps)

    def to_text(self) -> str:
        out = []
        for fields in self.segments:
            if fields[0] == "MSH":
                out.append(fields[0] + self.seps.field + self.seps.field.join(fields[2:]))
            else:
                out.append(self.seps.field.join(fields))
        return "\r".join(out) + "\r"

    # -- paths ---------------------------------------------------------------------------

    def _targets(self, path: str, create: bool) -> list[tuple[list[str], int, int | None, int, int]]:
        """(fields, field index, repetition index or None=all, component, sub) per match."""
        m = _WRITE_PATH.match(path)
        if not m:
            raise TransformError(f"not a field path: {path!r} (e.g. PID-3, PID-3(2).4.2, OBX[*]-5)")
        seg_id, occ = m.group("seg"), m.group("occ") or "1"
        field = int(m.group("field"))
        if field == 0 or (seg_id == "MSH" and field <= 2):
            raise TransformError(f"{path}: MSH-1/MSH-2 and field 0 cannot be changed")
        rep_s = m.group("rep") or "1"
        rep = None if rep_s == "*" else int(rep_s) - 1
        comp, sub = int(m.group("comp") or 0), int(m.group("sub") or 0)
        matches = [fields for fields in self.segments if fields[0] == seg_id]
        if occ != "*":
            n = int(occ)
            if len(matches) < n:
                if not create:
                    return []
                for _ in range(n - len(matches)):
                    self.segments.append([seg_id])
                matches = [fields for fields in self.segments if fields[0] == seg_id]
            matches = [matches[n - 1]]
        return [(fields, field, rep, comp, sub) for fields in matches]

    # -- reading -------------------------------------------------------------------------

    def get(self, path: str) -> list[str]:
        """Every unescaped value the path designates (several with `(*)` or `[*]`)."""
        values = []
        for fields, field, rep, comp, sub in self._targets(path, create=False):
            if field >= len(fields):
                continue
            reps = fields[field].split(self.seps.repetition) if fields[field] else []
            for i, r in enumerate(reps):
                if rep is not None and i != rep:
                    continue
                values.append(unescape(self._part(r, comp, sub), self.seps))
        return values

    def _part(self, repetition: str, comp: int, sub: int) -> str:
        if not comp:
            return repetition
        comps = repetition.split(self.seps.component)
        if comp > len(comps):
            return ""
        if not sub:
            return comps[comp - 1]
        subs = comps[comp - 1].split(self.seps.subcomponent)
        return subs[sub - 1] if sub <= len(subs) else ""

    # -- writing -------------------------------------------------------------------------

    def update(self, path: str, fn: Callable[[str], str | None], create: bool = True) -> int:
        """Replace each designated value by fn(old unescaped value); None leaves it. Returns count."""
        changed = 0
        seps = self.seps
        for fields, field, rep, comp, sub in self._targets(path, create=create):
            if field >= len(fields):
                if not create:
                    continue
                fields.extend([""] * (field + 1 - len(fields)))
            reps = fields[field].split(seps.repetition)
            indices = range(len(reps)) if rep is None else [rep]
            for i in indices:
                if i >= len(reps):
                    if not create:
                        continue
                    reps.extend([""] * (i + 1 - len(reps)))
                old = unescape(self._part(reps[i], comp, sub), seps)
                new = fn(old)
                if new is None:
                    continue
                reps[i] = self._with_part(reps[i], comp, sub, escape(new, seps) if comp else new)
                changed += 1
            fields[field] = seps.repetition.join(reps)
        return changed

    def _with_part(self, repetition: str, comp: int, sub: int, value: str) -> str:
        seps = self.seps
        if not comp:
            return value
        comps = repetition.split(seps.component)
        if comp > len(comps):
            comps.extend([""] * (comp - len(comps)))
        if not sub:
            comps[comp - 1] = value
        else:
            subs = comps[comp - 1].split(seps.subcomponent)
            if sub > len(subs):
                subs.extend([""] * (sub - len(subs)))
            subs[sub - 1] = value
            comps[comp - 1] = seps.subcomponent.join(subs)
        return seps.component.join(comps).rstrip(seps.component)

    def set(self, path: str, value: str) -> int:
        """Set a value; a whole field (no component) is taken as ER7 text, so `A^B` works."""
        return self.update(path, lambda _old: value)

    def delete(self, path: str) -> int:
        return self.update(path, lambda old: "" if old else None, create=False)

    def copy(self, source: str, target: str) -> int:
        values = self.get(source)
        if not values:
            return 0
        return self.set(target, values[0])
