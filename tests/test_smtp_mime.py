"""The mail reader's fast MIME walk finds the same attachments as the stdlib parser, nested
multiparts and encoded names included, and never raises on malformed mail."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from connectors.mail import read_mail
from tests.mail_samples import Mail, xdm_zip


def stdlib_attachments(raw: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [(p.get_filename() or "", p.get_payload(decode=True)) for p in msg.walk() if p.get_filename()]


def test_nested_multipart_and_encoded_names_read_like_the_stdlib_parser() -> None:
    msg = EmailMessage()
    msg["From"] = "=?utf-8?q?Dr_H=C3=A9l=C3=A8ne?= <helene@hopital.mssante.fr>"
    msg["To"] = "secretariat@relais.localhost"
    msg["Subject"] = "Résultats d'examen"
    msg["Message-ID"] = "<abc@hopital.mssante.fr>"
    msg["X-MSS-CODECDA"] = "11502-2"
    msg.set_content("texte")
    msg.add_alternative("<p>texte</p>", subtype="html")
    msg.add_attachment(xdm_zip(), maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    msg.add_attachment(b"%PDF-1.4\n.leading dot line\n", maintype="application", subtype="pdf",
                       filename="résultat n°1.pdf")  # fmt: skip
    msg.add_attachment("ligne 1\r\n--not a boundary\r\n", subtype="plain", filename="notes.txt")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    mail = read_mail(raw)
    assert [(a.filename, a.data) for a in mail.attachments] == stdlib_attachments(raw)
    assert mail.subject == "Résultats d'examen" and mail.header_from.startswith("Dr Hélène")
    assert mail.message_id == "<abc@hopital.mssante.fr>" and mail.mss_headers == {"X-MSS-CODECDA": "11502-2"}


def test_mail_with_lf_line_endings_and_without_closing_boundary_is_read() -> None:
    raw = Mail(attachments=[("a.pdf", "application/pdf", b"%PDF a")]).build().as_bytes()  # LF endings
    assert [(a.filename, a.data) for a in read_mail(raw).attachments] == [("a.pdf", b"%PDF a")]
    cut = raw[: raw.rindex(b"--")]  # closing delimiter lost
    assert [a.filename for a in read_mail(cut).attachments] == ["a.pdf"]


def test_malformed_mail_is_read_without_raising() -> None:
    for raw in (b"", b"no headers at all", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                b"Subject: =?bad?x?zz?=\r\nContent-Type: text/plain\r\n\r\nbody",
                b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64"):  # fmt: skip
        read_mail(raw)
