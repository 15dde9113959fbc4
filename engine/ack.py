"""HL7 v2 acknowledgements (ACK) built from the message they answer.

An ACK is a pure function of the message, its durable receipt and the verdict: a resend
gets byte-for-byte the ACK the original got. Fields per HL7 v2.5 §2.9 and IHE PAM France:
MSH-3/4 and MSH-5/6 swapped, `ACK^<trigger>^ACK`, MSA-2 = the original MSH-10.
"""

from __future__ import annotations

from engine.er7 import Er7Message, Separators

__all__ = ["build_ack", "escape", "hl7_timestamp"]

_DEFAULT = Separators()


def escape(value: str, seps: Separators) -> str:
    """Escape delimiter characters so `value` reads back as itself."""
    if not value:
        return value
    esc = seps.escape or "\\"
    out = value.replace(esc, f"{esc}E{esc}")
    for ch, code in (
        (seps.field, "F"),
        (seps.component, "S"),
        (seps.subcomponent, "T"),
        (seps.repetition, "R"),
    ):
        out = out.replace(ch, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


def hl7_timestamp(iso: str) -> str:
    """'2026-11-23T22:28:53.123456+00:00' -> '20261123222853.1234+0000'."""
    date, _, rest = iso.partition("T")
    clock = rest[:15].replace(":", "")  # HHMMSS.ffffff
    whole, _, frac = clock.partition(".")
    return f"{date.replace('-', '')}{whole}.{frac[:4] or '0000'}+0000"


def build_ack(
    message: Er7Message | None,
    *,
    code: str,
    control_id: str,
    received_at: str,
    error_code: str = "",
    reason: str = "",
    location: str = "",
) -> str:
    """The ACK text (segments joined by CR) answering `message` (None if unreadable)."""
    seps = message.separators if message is not None else _DEFAULT
    f, c = seps.field, seps.component
    if message is not None:
        get = message.raw_field
        sending_app, sending_fac = get("MSH", 3), get("MSH", 4)
        receiving_app, receiving_fac = get("MSH", 5), get("MSH", 6)
        trigger = message.get("MSH-9.2")
        original_control_id = get("MSH", 10)
        processing_id = get("MSH", 11) or "P"
        version = get("MSH", 12) or "2.5"
        charset = get("MSH", 18)
    else:
        sending_app = sending_fac = receiving_app = receiving_fac = trigger = ""
        original_control_id = charset = ""
        processing_id, version = "P", "2.5"
    msh = [
        "MSH",
        seps.encoding_characters,
        receiving_app,
        receiving_fac,
        sending_app,
        sending_fac,
        hl7_timestamp(received_at),
        "",
        f"ACK{c}{escape(trigger, seps)}{c}ACK" if trigger else f"ACK{c}{c}ACK",
        control_id,
        processing_id,
        version,
    ]
    if charset:
        msh += ["", "", "", "", "", charset]
    segments = [
        f.join(msh),
        f.join(["MSA", code, original_control_id, escape(reason, seps)]).rstrip(f),
    ]
    if error_code:
        loc = location.replace("-", c).split(c) if location else []
        # ERR-2 (ERL): segment ^ sequence ^ field; ERR-3: code ^ text ^ HL70357; ERR-4 severity.
        erl = c.join([loc[0], "1", *loc[1:2]]) if loc else ""
        err3 = c.join([error_code, escape(_TABLE_0357.get(error_code, ""), seps), "HL70357"])
        legacy = version[:3] < "2.5"
        err1 = (
            c.join([*([loc[0], "1", *loc[1:2]] if loc else ["", "", ""]), err3.replace(c, seps.subcomponent)])
            if legacy
            else ""
        )
        severity = "W" if code in ("AA", "CA") else "E"
        segments.append(f.join(["ERR", err1, erl, err3, severity, "", "", "", escape(reason, seps)]))
    return "\r".join(segments) + "\r"


_TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
