"""A received mail as MSSanté reads it: the main headers, the `X-MSS-*` headers and the
attachments, with the stdlib `email` parser (modern policy). Parsing never raises: what
cannot be read is reported in `problems`.

    >>> mail = read_mail(raw_bytes)
    >>> mail.message_id, [a.filename for a in mail.attachments]
"""

from __future__ import annotations

import binascii
import email
import email.header
import email.parser
import email.policy
import email.utils
import quopri
import re
from dataclasses import dataclass, field
from email.message import Message

__all__ = ["Attachment", "MailContent", "read_mail"]


@dataclass
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass
class MailContent:
    message_id: str = ""
    subject: str = ""
    header_from: str = ""
    disposition_notification_to: str = ""
    mss_headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _header(msg: Message, name: str, problems: list[str]) -> str:
    """A header's value decoded with the modern policy (RFC 2047 words, folding)."""
    raw = msg.get(name)
    if raw is None:
        return ""
    text = str(raw)
    if "=?" not in text and text.isascii():  # nothing to decode: unfold (the parser costs ~0.1 ms)
        return " ".join(text.split())
    try:
        return str(email.policy.default.header_fetch_parse(name, str(raw))).strip()
    except Exception:  # a malformed header must not cost the mail
        problems.append(f"header {name} is malformed")
        return str(raw)[:998]


def read_mail(raw: bytes) -> MailContent:
    """Headers with the `email` parser; the MIME tree walked by splitting on boundaries, which
    is ~10x faster than the line-by-line feed parser on base64 attachments. Anything the walker
    does not expect (a multipart without boundary, say) falls back to the full parser."""
    head, body = _split_head(raw)
    msg = _HEADERS.parsebytes(head)
    mail = MailContent()
    problems = mail.problems
    mail.message_id = _header(msg, "Message-ID", problems)
    mail.subject = _header(msg, "Subject", problems)
    mail.header_from = _header(msg, "From", problems)
    dnt = _header(msg, "Disposition-Notification-To", problems)
    if dnt:
        mail.disposition_notification_to = email.utils.parseaddr(dnt)[1]
    for name in list(msg):
        if name.lower().startswith("x-mss-"):
            mail.mss_headers[name.upper()] = _header(msg, name, problems)
    try:
        _walk(msg, body, mail, depth=0)
    except _Unexpected:
        mail.attachments.clear()
        _walk_full(raw, mail)
    return mail


# The MIME structure is read with compat32 header objects (plain strings): the modern
# policy's header classes cost ~0.1 ms per header and a mail has a dozen per part.
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class _Unexpected(Exception):
    pass


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw.split(b"\n", 1)[1]
    m = _HEAD_END.search(raw)
    if m is None:
        return raw, b""
    return raw[: m.end()], raw[m.end() :]


def _parts(body: bytes, boundary: str) -> list[bytes]:
    """The body parts between `--boundary` lines (RFC 2046 5.1.1), preamble and epilogue
    dropped; bytes.find rather than a regex: a regex tries every position of a 100 KB body."""
    marker = b"--" + boundary.encode()
    parts: list[bytes] = []
    start: int | None = None
    pos = 0
    while (i := body.find(marker, pos)) >= 0:
        pos = i + len(marker)
        if i > 0 and body[i - 1 : i] != b"\n":
            continue  # not at the start of a line
        nl = body.find(b"\n", pos)
        line_end = len(body) if nl < 0 else nl + 1
        rest = body[pos:line_end].rstrip(b"\r\n")
        closing = rest.startswith(b"--")
        if (rest[2:] if closing else rest).strip(b" \t"):
            continue  # `--boundary-more`: another boundary that starts like ours
        if start is not None:
            content_end = i - 2 if body[i - 2 : i] == b"\r\n" else max(i - 1, start)
            parts.append(body[start:content_end])
        if closing:
            return parts
        start = pos = line_end
    if start is not None:
        parts.append(body[start:])  # no closing delimiter: keep what came
    return parts


def _decode(part: Message, body: bytes) -> bytes:
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte == "base64":
        return binascii.a2b_base64(body)
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _walk(part: Message, body: bytes, mail: MailContent, depth: int) -> None:
    if depth > 10:
        raise _Unexpected
    if part.get_content_maintype() == "multipart":
        boundary = part.get_boundary()
        if not boundary:
            raise _Unexpected
        for chunk in _parts(body, boundary):
            head, inner = _split_head(chunk)
            child = _HEADERS.parsebytes(head)
            _walk(child, inner, mail, depth + 1)
        return
    filename = part.get_filename()  # Content-Disposition filename, else Content-Type name (RFC 2231)
    if filename:
        filename = _header_text(filename)
    if not filename and part.get_content_disposition() != "attachment":
        return  # the body text
    try:
        data = _decode(part, body)
    except (binascii.Error, ValueError):
        mail.problems.append("an attachment cannot be decoded")
        return
    mail.attachments.append(Attachment(filename or "", part.get_content_type(), data))


def _header_text(value: str) -> str:
    """A filename may be RFC 2047-encoded (`=?utf-8?q?...?=`) even where it should not be."""
    if "=?" not in value:
        return value
    return str(email.header.make_header(email.header.decode_header(value)))


def _walk_full(raw: bytes, mail: MailContent) -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        if not filename and part.get_content_disposition() != "attachment":
            continue
        try:
            data = part.get_payload(decode=True)
        except Exception:
            mail.problems.append("an attachment cannot be decoded")
            continue
        if isinstance(data, bytes):
            mail.attachments.append(Attachment(filename or "", part.get_content_type(), data))
    for defect in msg.defects:
        mail.problems.append(type(defect).__name__)
