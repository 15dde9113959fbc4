"""A small, strict-enough reader for HL7 v2 ER7 ("pipe") encoding.

It reads the fields the engine needs on the ACK path in microseconds; hl7apy stays for
full structural validation and for building messages where a whole structure is needed.

    >>> msg = Er7Message.parse("MSH|^~\\&|APP|FAC|||20260101||ADT^A01|42|P|2.5\\rPID|||123^^^HOP&1.2&ISO^PI")
    >>> msg.get("MSH-9.2"), msg.get("PID-3.4.2")
    ('A01', '1.2')
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["Er7Error", "Er7Message", "Separators", "unescape"]

_LEADING_JUNK = "\ufeff\r\n \t\x00"  # BOM, blank lines, NULs some senders put before MSH
_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+)\])?"
    r"(?:-(?P<field>\d+)(?:\((?P<rep>\d+)\))?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$"
)


_POSITIONS = ("occ", "field", "rep", "comp", "sub")


class Er7Error(ValueError):
    """The bytes are not readable as an ER7 message (no MSH, bad delimiters...)."""


@dataclass(frozen=True, slots=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return f"{self.component}{self.repetition}{self.escape}{self.subcomponent}"


def unescape(value: str, seps: Separators) -> str:
    """Resolve HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\)."""
    esc = seps.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != esc:
            out.append(ch)
            i += 1
            continue
        end = value.find(esc, i + 1)
        if end < 0:  # a lone escape character: keep it as sent
            out.append(value[i:])
            break
        code = value[i + 1 : end]
        if code == "F":
            out.append(seps.field)
        elif code == "S":
            out.append(seps.component)
        elif code == "T":
            out.append(seps.subcomponent)
        elif code == "R":
            out.append(seps.repetition)
        elif code == "E":
            out.append(esc)
        elif code == ".br":
            out.append("\n")
        elif code in ("H", "N"):
            pass  # highlighting on/off carries no data
        elif code[:1] == "X" and len(code) % 2 == 1:
            try:
                out.append(bytes.fromhex(code[1:]).decode("latin-1"))
            except ValueError:
                out.append(value[i : end + 1])
        else:  # charset switches (\C..\, \M..\) and unknown codes are kept verbatim
            out.append(value[i : end + 1])
        i = end + 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _parse_path(path: str) -> tuple[str, int, int, int, int, int]:
    """(segment, occurrence, field, repetition, component, sub-component), all 1-based."""
    m = _PATH.match(path)
    if not m or m.group("field") is None:
        raise ValueError(f"not a field path: {path!r}")
    if any(m.group(k) is not None and int(m.group(k)) == 0 for k in _POSITIONS):
        raise ValueError(f"positions in a field path start at 1: {path!r}")
    return (
        m.group("seg"),
        int(m.group("occ") or 1),
        int(m.group("field")),
        int(m.group("rep") or 1),
        int(m.group("comp") or 1),
        int(m.group("sub") or 1),
    )


class Er7Message:
    """One HL7 v2 message read from its ER7 text; fields are split only when asked for."""

    __slots__ = ("_fields", "_where", "segments", "separators")

    def __init__(self, segments: list[str], separators: Separators) -> None:
        self.segments = segments
        self.separators = separators
        self._fields: dict[int, list[str]] = {}
        self._where: dict[str, list[int]] | None = None  # segment ID -> positions, built once

    @classmethod
    def parse(cls, text: str) -> Er7Message:
        """Read ER7 text; segments may end with CR, LF or CRLF. Raises Er7Error."""
        text = text.lstrip(_LEADING_JUNK)
        if not text.startswith("MSH") or len(text) < 8:
            raise Er7Error("message does not start with an MSH segment")
        field_sep = text[3]
        if field_sep.isalnum() or field_sep.isspace():
            raise Er7Error("MSH-1 field separator is missing or invalid")
        # MSH-2 is read within the MSH segment; most senders end segments with CR only.
        lf = "\n" in text
        first = re.split(r"[\r\n]", text, maxsplit=1)[0] if lf else text.split("\r", 1)[0]
        end = first.find(field_sep, 4)
        enc = first[4:end] if end > 0 else first[4:8]
        if (
            len(enc) < 2
            or field_sep in enc
            or len(set(enc)) != len(enc)  # a delimiter used twice makes the message ambiguous
            or any(c.isalnum() or c.isspace() for c in enc)
        ):
            raise Er7Error("MSH-2 encoding characters are missing or invalid")
        seps = Separators(
            field=field_sep,
            component=enc[0],
            repetition=enc[1],
            escape=enc[2] if len(enc) > 2 else "",
            subcomponent=enc[3] if len(enc) > 3 else "&",
        )
        raw = re.split(r"\r\n?|\n", text) if lf else text.split("\r")  # CR, LF or CRLF, even mixed
        segments = [s for s in (r.rstrip() for r in raw) if s]
        for number, seg in enumerate(segments[1:], start=2):
            head = seg[:3]
            if not (
                len(head) == 3 and head.isalnum() and head.isascii() and head[0].isupper() and head.upper() == head
            ) or (len(seg) > 3 and seg[3] != field_sep):
                raise Er7Error(f"segment {number} has no valid segment ID")
        return cls(segments, seps)

    # -- structure ---------------------------------------------------------------------

    def segment_ids(self) -> list[str]:
        return [s[:3] for s in self.segments]

    def _segment_fields(self, index: int) -> list[str]:
        fields = self._fields.get(index)
        if fields is None:
            seg = self.segments[index]
            fields = seg.split(self.separators.field)
            if fields[0] == "MSH":
                # MSH-1 is the field separator itself: shift so that fields[n] is MSH-n.
                fields.insert(1, self.separators.field)
            self._fields[index] = fields
        return fields

    def _segment_index(self, seg_id: str, occurrence: int = 1) -> int | None:
        where = self._where
        if where is None:
            where = self._where = {}
            for i, seg in enumerate(self.segments):
                where.setdefault(seg[:3], []).append(i)
        found = where.get(seg_id)
        return found[occurrence - 1] if found and len(found) >= occurrence else None

    def has_segment(self, seg_id: str) -> bool:
        return self._segment_index(seg_id) is not None

    def raw_field(self, seg_id: str, field: int, occurrence: int = 1) -> str:
        """The escaped text of a whole field, all repetitions included ('' if absent)."""
        idx = self._segment_index(seg_id, occurrence)
        if idx is None:
            return ""
        fields = self._segment_fields(idx)
        if seg_id == "MSH" and field in (1, 2):
            return fields[field] if field < len(fields) else ""
        return fields[field] if field < len(fields) else ""

    def repetitions(self, seg_id: str, field: int, occurrence: int = 1) -> list[str]:
        raw = self.raw_field(seg_id, field, occurrence)
        if not raw:
            return []
        if seg_id == "MSH" and field == 2:
            return [raw]
        return raw.split(self.separators.repetition)

    def components(self, repetition: str) -> list[list[str]]:
        """Components of one repetition, each a list of unescaped sub-components."""
        seps = self.separators
        if seps.subcomponent not in repetition and (not seps.escape or seps.escape not in repetition):
            return [[comp] for comp in repetition.split(seps.component)]  # nothing to split or undo
        return [
            [unescape(sub, seps) for sub in comp.split(seps.subcomponent)] for comp in repetition.split(seps.component)
        ]

    def get(self, path: str, default: str = "") -> str:
        """The unescaped value at a terse path: `PID-3`, `PID-3.4.2`, `PID-3(2).1`, `OBX[2]-5`.

        Without a component the first component is returned (ER7's usual meaning of a
        simple value); `(n)` picks a repetition, `[n]` a segment occurrence (1-based).
        """
        seg_id, occurrence, field, rep, comp, sub = _parse_path(path)
        return self.value(seg_id, field, comp, sub, rep, occurrence) or default

    def value(self, seg_id: str, field: int, comp: int = 1, sub: int = 1, rep: int = 1, occurrence: int = 1) -> str:
        """`get` without a path to read: the unescaped value at those positions ('' if absent)."""
        idx = self._segment_index(seg_id, occurrence)
        if idx is None:
            return ""
        fields = self._segment_fields(idx)
        if field >= len(fields):
            return ""
        raw = fields[field]
        if seg_id == "MSH" and field <= 2:
            return raw
        seps = self.separators
        if rep > 1 or seps.repetition in raw:
            reps = raw.split(seps.repetition)
            if len(reps) < rep:
                return ""
            raw = reps[rep - 1]
        comps = raw.split(seps.component, comp)
        if len(comps) < comp:
            return ""
        raw = comps[comp - 1]
        if sub > 1 or seps.subcomponent in raw:
            subs = raw.split(seps.subcomponent)
            if len(subs) < sub:
                return ""
            raw = subs[sub - 1]
        return unescape(raw, seps)
