"""A received mail as MSSanté reads it: the main headers, the `X-MSS-*` headers and the
attachments, with the stdlib `email` parser (modern policy). Parsing never raises: what
cannot be read is reported in `problems`.

    >>> mail = read_mail(raw_bytes)
    >>> mail.message_id, [a.filename for a in mail.attachments]
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from dataclasses import dataclass, field
from email.message import EmailMessage

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


def _header(msg: EmailMessage, name: str, problems: list[str]) -> str:
    try:
        value = msg.get(name)
        return str(value).strip() if value is not None else ""
    except Exception:  # a malformed header must not cost the mail
        problems.append(f"header {name} is malformed")
        raw = msg.get_all(name, failobj=[""])
        return str(raw[0])[:998] if raw else ""


def read_mail(raw: bytes) -> MailContent:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
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
    for part in msg.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        disposition = part.get_content_disposition()
        if not filename and disposition != "attachment":
            continue  # the body text
        try:
            data = part.get_payload(decode=True)
        except Exception:
            problems.append("an attachment cannot be decoded")
            continue
        if not isinstance(data, bytes):
            continue
        mail.attachments.append(Attachment(filename or "", part.get_content_type(), data))
    for defect in msg.defects:
        problems.append(type(defect).__name__)
    return mail
