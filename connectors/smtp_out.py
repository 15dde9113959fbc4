"""Outbound SMTP (a mailbox on an MSSanté relay): STARTTLS is required before AUTH and the
mail; a `message/rfc822` payload (an MDN, a mail) goes as is, anything else is attached
to a short mail. smtplib is blocking: each delivery runs on a worker thread.

    >>> dest = SmtpDestination("relay", "relay.example", 587, mail_from="relais@grades.example", to=["x@y"])
    >>> await dest.deliver(delivery)
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import smtplib
import ssl
from email.message import EmailMessage
from email.parser import BytesHeaderParser

import structlog

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure
from connectors.file import safe_basename

__all__ = ["SmtpDestination", "recipients_of"]

log = structlog.get_logger("relais.out.smtp")

EXTENSIONS = {"application/hl7-v2": "hl7", "application/pdf": "pdf", "text/xml": "xml", "application/json": "json",
              "application/dicom": "dcm", "application/zip": "zip"}  # fmt: skip


def recipients_of(raw: bytes) -> list[str]:
    """The To/Cc addresses of a mail (where an MDN goes when no recipient is configured)."""
    head = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    pairs = email.utils.getaddresses([str(v) for v in head.get_all("To", []) + head.get_all("Cc", [])])
    return [addr for _, addr in pairs if "@" in addr]


class SmtpDestination:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        mail_from: str,
        to: list[str] | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        subject: str = "Document transmis par Relais",
        helo: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.mail_from = mail_from
        self.to = list(to or [])
        self.username = username
        self.password = password
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.ssl_context.minimum_version = max(self.ssl_context.minimum_version, ssl.TLSVersion.TLSv1_2)
        self.timeout = timeout
        self.subject = subject
        self.helo = helo

    def _mail(self, delivery: Delivery) -> tuple[bytes, list[str]]:
        if delivery.content_type == "message/rfc822":
            to = self.to or recipients_of(delivery.payload)
            return delivery.payload, to
        msg = EmailMessage()
        msg["From"] = self.mail_from
        msg["To"] = ", ".join(self.to)
        msg["Subject"] = self.subject
        msg["Message-ID"] = f"<{delivery.delivery_id}@relais>"
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg.set_content(f"Relais delivery {delivery.delivery_id} (message {delivery.message_id}).\n")
        maintype, _, subtype = delivery.content_type.partition("/")
        ext = EXTENSIONS.get(delivery.content_type, "bin")
        # A routed document keeps its own file name (made safe: no path, no control characters).
        named = str(delivery.metadata.get("filename") or "")
        filename = safe_basename(named) if named else f"{delivery.delivery_id}.{ext}"
        msg.add_attachment(delivery.payload, maintype=maintype or "application", subtype=subtype or "octet-stream",
                           filename=filename)  # fmt: skip
        return msg.as_bytes(policy=email.policy.SMTP), list(self.to)

    def _send(self, raw: bytes, to: list[str]) -> str:
        """On a worker thread: one SMTP session, STARTTLS required. Returns the 250 line."""
        try:
            with smtplib.SMTP(self.host, self.port, local_hostname=self.helo, timeout=self.timeout) as smtp:
                smtp.ehlo()
                if not smtp.has_extn("starttls"):
                    raise TemporaryFailure(f"{self.host}:{self.port} does not offer STARTTLS; nothing sent in clear")
                smtp.starttls(context=self.ssl_context)
                smtp.ehlo()
                if self.username is not None:
                    smtp.login(self.username, self.password or "")
                code, reply = smtp.mail(self.mail_from)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, self.mail_from)
                accepted = 0
                refused: list[str] = []
                for rcpt in to:
                    code, reply = smtp.rcpt(rcpt)
                    if code in (250, 251):
                        accepted += 1
                    elif code >= 500:
                        refused.append(f"{code}")
                    else:
                        raise TemporaryFailure(f"RCPT answered {code}")
                if not accepted:
                    raise PermanentFailure(f"every recipient refused ({', '.join(refused)})")
                code, reply = smtp.data(raw)
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
                return f"250 {reply.decode('utf-8', 'replace')[:120]}"
        except (TemporaryFailure, PermanentFailure):
            raise
        except smtplib.SMTPAuthenticationError as e:
            raise TemporaryFailure(f"AUTH refused ({e.smtp_code})") from None
        except smtplib.SMTPResponseException as e:
            if 500 <= e.smtp_code < 600:
                raise PermanentFailure(f"SMTP {e.smtp_code}") from None
            raise TemporaryFailure(f"SMTP {e.smtp_code}") from None
        except (smtplib.SMTPException, ssl.SSLError, OSError) as e:
            raise TemporaryFailure(f"{type(e).__name__} talking to {self.host}:{self.port}") from None

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        raw, to = self._mail(delivery)
        if not to:
            raise PermanentFailure("no recipient: set `to` in the destination settings")
        detail = await asyncio.to_thread(self._send, raw, to)
        return DeliveryOutcome(detail=detail)

    async def close(self) -> None:
        """Nothing kept open: one session per delivery."""
