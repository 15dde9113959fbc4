"""The DIMSE command set and the P-DATA framing of PS3.7/PS3.8 as bytes, and the PS3.10 file
meta that heads each spooled instance: what connectors/dicom_association.py reads and writes.
"""

from __future__ import annotations

import struct

__all__ = [
    "ELEMENT",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "INVALID_PARAMETER",
    "PDU_HEADER",
    "PDV_HEADER",
    "P_DATA",
    "US",
    "ProtocolError",
    "decode_command",
    "encode_command",
    "file_meta",
    "p_data_pdus",
    "ui",
    "ui_value",
    "us",
]

# A UID under 2.25 (derived from a UUID, PS3.5 B.2): needs no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.1111287494164306013473657809847084910"
IMPLEMENTATION_VERSION = "RELAIS_1"

P_DATA = 0x04  # the P-DATA-TF PDU type
INVALID_PARAMETER = 0x06  # A-ABORT reason (PS3.8 9.3.8): invalid PDU parameter value

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
ELEMENT = struct.Struct("<HHI")
US = struct.Struct("<H")


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted with `reason`."""

    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_command(data: bytes) -> dict[int, bytes]:
    """A command set (group 0000, implicit VR little endian) as {element: value}."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            raise ProtocolError(INVALID_PARAMETER, "truncated command set")
        group, element, length = ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            raise ProtocolError(INVALID_PARAMETER, "command set element out of group 0000 or too long")
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def us(command: dict[int, bytes], element: int, default: int = 0) -> int:
    value = command.get(element)
    if value is None:
        return default
    if len(value) != 2:
        raise ProtocolError(INVALID_PARAMETER, f"command element (0000,{element:04X}) is not a US")
    return int(US.unpack(value)[0])


def ui(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def ui_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def p_data_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """The command in P-DATA-TF PDUs no longer than the peer accepts (0: no limit)."""
    room = peer_max_pdu - 6 if peer_max_pdu else len(command)
    room = max(room, 1)
    pdus = []
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        control = 0x03 if start + room >= len(command) else 0x01
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(P_DATA, len(pdv)) + pdv)
    return b"".join(pdus)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """128-byte preamble, DICM and the file meta group (explicit VR little endian, PS3.10 7.1)."""

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value

    ae = calling_ae.encode("ascii", "replace")
    body = b"".join([
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", ui_value(sop_class)),
        element(0x0003, b"UI", ui_value(sop_instance)),
        element(0x0010, b"UI", ui_value(transfer_syntax)),
        element(0x0012, b"UI", ui_value(IMPLEMENTATION_CLASS_UID)),
        element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
        *([element(0x0016, b"AE", ae + b" " * (len(ae) % 2))] if ae else []),
    ])  # fmt: skip
    return b"\x00" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<I", len(body))) + body
