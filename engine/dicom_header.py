"""The few identifying attributes of a received instance, read by walking its first bytes.

pydicom's `dcmread` costs ~1.5 ms per file here, a large part of a small instance's budget;
walking top-level elements of a little-endian file up to (0032,1033) costs a few dozen µs.
Anything unusual (big endian, deflate, non-ASCII values, a truncated or odd header) returns
None and the caller reads the file with pydicom instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["WANTED", "scan_header", "scan_header_bytes"]

WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00080080: "InstitutionName",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00321033: "RequestingService",
}
_LAST = max(WANTED)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})  # fmt: skip
_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT_PREFIXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")
_DEFLATED = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class _Odd(Exception):
    """Something this walker does not handle: let pydicom read the file."""


def scan_header(path: Path, limit: int = 256 * 1024) -> dict[str, str] | None:
    """The WANTED attributes (empty string when absent), or None to fall back to pydicom."""
    with path.open("rb") as f:
        data = f.read(limit)
    return scan_header_bytes(data, complete=len(data) < limit)


def scan_header_bytes(data: bytes, complete: bool) -> dict[str, str] | None:
    """The same from the file's first bytes (`complete`: they are the whole file)."""
    try:
        return _scan(data, complete=complete)
    except (_Odd, struct.error, IndexError, UnicodeDecodeError):
        return None


def _scan(data: bytes, complete: bool) -> dict[str, str]:
    if data[128:132] != b"DICM":
        raise _Odd
    pos, syntax = 132, ""
    while pos + 8 <= len(data):
        group, element = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        pos, value = _element(data, pos, explicit=True)
        if element == 0x0010:
            syntax = value.rstrip(b"\0 ").decode("ascii")
    if syntax == _IMPLICIT:
        explicit = False
    elif syntax.startswith(_EXPLICIT_PREFIXES) and syntax != _DEFLATED:
        explicit = True
    else:
        raise _Odd
    found = dict.fromkeys(WANTED.values(), "")
    while pos + 8 <= len(data):
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if tag > _LAST:
            return found
        pos, value = _element(data, pos, explicit)
        if tag in WANTED:
            if any(b > 0x7F for b in value):
                raise _Odd  # a character set to honour: pydicom's job
            found[WANTED[tag]] = value.decode("ascii").strip("\0 ")
    if not complete:
        raise _Odd  # the header goes past what was read
    return found


def _element(data: bytes, pos: int, explicit: bool) -> tuple[int, bytes]:
    """(position after the element, its value bytes; empty for a sequence)."""
    if explicit:
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, start = _U32.unpack_from(data, pos + 8)[0], pos + 12
        elif vr in _SHORT_VRS:
            length, start = _U16.unpack_from(data, pos + 6)[0], pos + 8
        else:
            raise _Odd
    else:
        length, start = _U32.unpack_from(data, pos + 4)[0], pos + 8
    if length == _UNDEFINED:
        return _skip_undefined(data, start, explicit), b""
    end = start + length
    if end > len(data):
        raise _Odd
    return end, data[start:end]


def _skip_undefined(data: bytes, pos: int, explicit: bool) -> int:
    """Past a sequence of undefined length: its items, each a dataset, up to the delimiter."""
    while True:
        group, element = _TAG.unpack_from(data, pos)
        tag, length = group << 16 | element, _U32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Odd
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: elements up to the item delimiter
            group, element = _TAG.unpack_from(data, pos)
            if group << 16 | element == _ITEM_END:
                pos += 8
                break
            pos, _ = _element(data, pos, explicit)
