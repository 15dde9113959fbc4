"""MSSanté mails and IHE XDM archives built by the tests (and the bench), following the IHE
layout: README.TXT, INDEX.HTM, IHE_XDM/SUBSET01/METADATA.XML and the documents."""

from __future__ import annotations

import email.policy
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from xml.sax.saxutils import escape

INS = "260058815400233"
INS_OID = "1.2.250.1.213.1.4.8"
LOINC = "2.16.840.1.113883.6.1"


@dataclass
class Doc:
    filename: str = "DOC0001.XML"
    mime_type: str = "text/xml"
    data: bytes = b""
    type_code: str = "11490-0"
    class_code: str = "10"
    confidentiality: str = "N"
    patient_id: str = INS
    author: str = "801234567897^MARTIN^JEANNE^^^^^^&1.2.250.1.71.4.2.1&ISO"
    hash_override: str | None = None


def cda(ins: str = INS, birth: str = "19800101", size: int = 0) -> bytes:
    """A small CDA R2 document; `size` pads its text to about that many bytes."""
    filler = ("Compte rendu de sortie. " * (size // 24 + 1))[:size]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">'
        f'<recordTarget><patientRole><id root="{INS_OID}" extension="{ins}"/>'
        f'<patient><birthTime value="{birth}"/></patient></patientRole></recordTarget>'
        f"<component><nonXMLBody><text>{filler}</text></nonXMLBody></component>"
        "</ClinicalDocument>"
    ).encode()


def _classification(scheme: str, obj: str, code: str, coding: str, name: str = "") -> str:
    return (
        f'<rim:Classification classificationScheme="{scheme}" classifiedObject="{obj}" '
        f'nodeRepresentation="{code}" id="c-{obj}-{scheme[-4:]}">'
        f'<rim:Slot name="codingScheme"><rim:ValueList><rim:Value>{coding}</rim:Value></rim:ValueList></rim:Slot>'
        f'<rim:Name><rim:LocalizedString value="{name}"/></rim:Name></rim:Classification>'
    )


def metadata_xml(docs: list[Doc], set_patient: str | None = INS, birth: str = "19800101") -> bytes:
    entries = []
    for i, d in enumerate(docs, 1):
        obj = f"Document{i:02d}"
        digest = d.hash_override if d.hash_override is not None else hashlib.sha1(d.data).hexdigest()
        entries.append(
            f'<rim:ExtrinsicObject id="{obj}" mimeType="{d.mime_type}" '
            'objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">'
            f'<rim:Slot name="URI"><rim:ValueList><rim:Value>{d.filename}</rim:Value></rim:ValueList></rim:Slot>'
            f'<rim:Slot name="hash"><rim:ValueList><rim:Value>{digest}</rim:Value></rim:ValueList></rim:Slot>'
            f'<rim:Slot name="size"><rim:ValueList><rim:Value>{len(d.data)}</rim:Value></rim:ValueList></rim:Slot>'
            '<rim:Slot name="creationTime"><rim:ValueList><rim:Value>20261124101500</rim:Value>'
            "</rim:ValueList></rim:Slot>"
            '<rim:Slot name="sourcePatientInfo"><rim:ValueList>'
            f"<rim:Value>PID-5|NOM^PRENOM</rim:Value><rim:Value>PID-7|{birth}</rim:Value>"
            "</rim:ValueList></rim:Slot>"
            f'<rim:Name><rim:LocalizedString value="Document {i}"/></rim:Name>'
            + _classification(
                "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a", obj, d.class_code, "1.2.250.1.213.1.1.4.1"
            )
            + _classification("urn:uuid:f0306f51-975f-434e-a61c-c59651d33983", obj, d.type_code, LOINC, "CR")
            + _classification(
                "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f", obj, d.confidentiality, "2.16.840.1.113883.5.25"
            )
            + '<rim:Classification classificationScheme="urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d" '
            f'classifiedObject="{obj}" nodeRepresentation="" id="author-{i}">'
            f'<rim:Slot name="authorPerson"><rim:ValueList><rim:Value>{escape(d.author)}</rim:Value>'
            "</rim:ValueList></rim:Slot>"
            '<rim:Slot name="authorInstitution"><rim:ValueList>'
            "<rim:Value>CHU EXEMPLE^^^^^&amp;1.2.250.1.71.4.2.2&amp;ISO^^^^3340780477</rim:Value>"
            "</rim:ValueList></rim:Slot></rim:Classification>"
            + (
                '<rim:ExternalIdentifier identificationScheme="urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427" '
                f'value="{d.patient_id}^^^&amp;{INS_OID}&amp;ISO^NH" id="pid-{i}"/>'
                if d.patient_id
                else ""
            )
            + '<rim:ExternalIdentifier identificationScheme="urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab" '
            f'value="1.2.250.1.999.{i}" id="uid-{i}"/>'
            "</rim:ExtrinsicObject>"
        )
    package = (
        '<rim:RegistryPackage id="SubmissionSet01">'
        + (
            '<rim:ExternalIdentifier identificationScheme="urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446" '
            f'value="{set_patient}^^^&amp;{INS_OID}&amp;ISO^NH" id="set-pid"/>'
            if set_patient
            else ""
        )
        + "</rim:RegistryPackage>"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0" '
        'xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"><rim:RegistryObjectList>'
        + "".join(entries)
        + package
        + "</rim:RegistryObjectList></lcm:SubmitObjectsRequest>"
    ).encode()


def xdm_zip(docs: list[Doc] | None = None, *, set_patient: str | None = INS, extra: dict[str, bytes] | None = None,
            metadata: bytes | None = None) -> bytes:  # fmt: skip
    """An IHE_XDM.ZIP: README.TXT, INDEX.HTM, IHE_XDM/SUBSET01/METADATA.XML + documents."""
    docs = docs if docs is not None else [Doc(data=cda())]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.TXT", "Archive IHE XDM produite par les tests de Relais.\r\n")
        zf.writestr("INDEX.HTM", "<html><body><a href='IHE_XDM/SUBSET01/METADATA.XML'>METADATA</a></body></html>")
        zf.writestr(
            "IHE_XDM/SUBSET01/METADATA.XML", metadata if metadata is not None else metadata_xml(docs, set_patient)
        )
        for d in docs:
            zf.writestr(f"IHE_XDM/SUBSET01/{d.filename}", d.data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out.getvalue()


@dataclass
class Mail:
    sender: str = "dr.martin@hopital.mssante.fr"
    to: list[str] = field(default_factory=lambda: ["secretariat@relais.localhost"])
    subject: str = "Compte rendu"
    xdm: bytes | None = None
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    notify: str = ""  # Disposition-Notification-To

    def build(self) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Subject"] = self.subject
        msg["Message-ID"] = make_msgid(domain="hopital.mssante.fr")
        if self.notify:
            msg["Disposition-Notification-To"] = self.notify
        for name, value in self.headers.items():
            msg[name] = value
        msg.set_content("Bonjour,\nveuillez trouver ci-joint le document.\n")
        if self.xdm is not None:
            msg.add_attachment(self.xdm, maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
        for filename, ctype, data in self.attachments:
            maintype, subtype = ctype.split("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        return msg

    def bytes(self) -> bytes:
        return self.build().as_bytes(policy=email.policy.SMTP)  # CRLF, as on the wire
