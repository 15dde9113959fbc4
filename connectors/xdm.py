"""IHE XDM archives (`IHE_XDM.ZIP`) as MSSanté mails carry them, read defensively: the zip
is checked (members, sizes, ratios, paths, nested archives) before anything is extracted,
then `IHE_XDM/SUBSET01/METADATA.XML` (ebRIM) gives the patient and one entry per document.

    >>> archive = read_xdm(zip_bytes)          # raises XdmRefused(code, reason)
    >>> archive.patient_id, [d.filename for d in archive.documents]
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INS_OIDS", "XdmArchive", "XdmDocument", "XdmLimits", "XdmRefused", "read_xdm", "split_cx"]

RIM = "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}"
# XDS.b classification schemes (ITI TF-3 4.2.5) and external identifiers.
CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
FACILITY_TYPE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
PRACTICE_SETTING = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DOC_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DOC_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SET_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
CODES = {
    CLASS_CODE: "classCode", TYPE_CODE: "typeCode", CONFIDENTIALITY: "confidentialityCode",
    FORMAT_CODE: "formatCode", FACILITY_TYPE: "healthcareFacilityTypeCode", PRACTICE_SETTING: "practiceSettingCode",
}  # fmt: skip
# INS-NIR, INS-NIA, INS-NIR test, INS-NIR demo (STANDARDS.md).
INS_OIDS = frozenset({"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"})
METADATA = "IHE_XDM/SUBSET01/METADATA.XML"
ARCHIVE_SUFFIXES = (".zip", ".jar", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".7z", ".rar")
ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh")


class XdmRefused(Exception):
    """The archive is not taken; `code` is stable (for MDNs and queries), `reason` says why
    in words free of patient data."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class XdmLimits:
    max_members: int = 500
    max_total_bytes: int = 200 * 1024 * 1024
    max_ratio: float = 100.0  # uncompressed / compressed, for members over 1 MB


@dataclass
class XdmDocument:
    entry_id: str
    filename: str
    mime_type: str
    data: bytes
    patient_id: str
    patient_id_authority: str
    class_code: str
    type_code: str
    author: str
    confidentiality: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class XdmArchive:
    patient_id: str  # the submission set's patientId (CX value), "" when absent
    patient_id_authority: str
    documents: list[XdmDocument]
    source_patient_info: dict[str, str] = field(default_factory=dict)


def split_cx(cx: str) -> tuple[str, str]:
    """`ID^^^&OID&ISO^NH` -> (ID, OID)."""
    parts = cx.split("^")
    authority = parts[3].split("&") if len(parts) > 3 else []
    return parts[0], authority[1] if len(authority) > 1 else ""


def _member_names(zf: zipfile.ZipFile, limits: XdmLimits) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise XdmRefused("zip-too-many-members", f"{len(infos)} members (limit {limits.max_members})")
    total = 0
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\0" in name:
            raise XdmRefused("zip-unsafe-path", "a member has an absolute or non-portable path")
        norm = posixpath.normpath(name)
        if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
            raise XdmRefused("zip-unsafe-path", "a member path climbs out of the archive")
        if info.flag_bits & 0x1:
            raise XdmRefused("zip-encrypted", "encrypted members are not accepted")
        if info.is_dir():
            continue
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            raise XdmRefused("zip-nested-archive", "the archive contains another archive")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise XdmRefused("zip-too-large", f"more than {limits.max_total_bytes} bytes uncompressed")
        if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise XdmRefused("zip-bomb", "a member's compression ratio is beyond the limit")
        key = norm.upper()
        if key in members:
            raise XdmRefused("zip-duplicate-member", "two members have the same name")
        members[key] = info
    return members


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # zipfile stops at the declared size and checks the CRC, so a member cannot inflate
    # beyond what was checked above.
    data = zf.read(info)
    if data.startswith(ARCHIVE_MAGIC):
        raise XdmRefused("zip-nested-archive", "a member is itself an archive")
    return data


def _parse_xml(data: bytes) -> ET.Element:
    head = data[:4096].upper()
    if b"<!DOCTYPE" in head or b"<!ENTITY" in data.upper():
        raise XdmRefused("metadata-unreadable", "METADATA.XML declares a DTD or entities")
    try:
        return ET.fromstring(data)
    except ET.ParseError as e:
        raise XdmRefused("metadata-unreadable", f"METADATA.XML is not well-formed XML ({e.code})") from e


def _slots(obj: ET.Element) -> dict[str, list[str]]:
    return {
        slot.get("name", ""): [v.text or "" for v in slot.iter(f"{RIM}Value")] for slot in obj.findall(f"{RIM}Slot")
    }


def _name(obj: ET.Element) -> str:
    node = obj.find(f"{RIM}Name/{RIM}LocalizedString")
    return node.get("value", "") if node is not None else ""


def _external_ids(obj: ET.Element) -> dict[str, str]:
    return {e.get("identificationScheme", ""): e.get("value", "") for e in obj.findall(f"{RIM}ExternalIdentifier")}


def _classifications(root: ET.Element, obj: ET.Element) -> list[ET.Element]:
    oid = obj.get("id", "")
    inner = obj.findall(f"{RIM}Classification")
    outer = [c for c in root.iter(f"{RIM}Classification") if c.get("classifiedObject") == oid and c not in inner]
    return inner + outer


def read_xdm(data: bytes, limits: XdmLimits | None = None) -> XdmArchive:
    """The documents of an XDM zip with their metadata; raises XdmRefused."""
    limits = limits or XdmLimits()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise XdmRefused("zip-unreadable", "the attachment is not a readable zip archive") from e
    try:
        with zf:
            members = _member_names(zf, limits)
            info = members.get(METADATA)
            if info is None:
                raise XdmRefused("metadata-missing", f"{METADATA} is not in the archive")
            root = _parse_xml(_read(zf, info))
            return _archive(root, zf, members)
    except XdmRefused:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as e:
        raise XdmRefused("zip-unreadable", f"a member cannot be read ({type(e).__name__})") from e


def _archive(root: ET.Element, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> XdmArchive:
    set_patient, set_authority = "", ""
    for package in root.iter(f"{RIM}RegistryPackage"):
        cx = _external_ids(package).get(SET_PATIENT_ID, "")
        if cx:
            set_patient, set_authority = split_cx(cx)
            break
    documents: list[XdmDocument] = []
    source_info: dict[str, str] = {}
    entries = list(root.iter(f"{RIM}ExtrinsicObject"))
    if not entries:
        raise XdmRefused("metadata-no-document", "METADATA.XML lists no document")
    for entry in entries:
        slots = _slots(entry)
        uri = (slots.get("URI") or [""])[0]
        if not uri:
            raise XdmRefused("document-missing", "a document entry has no URI")
        path = posixpath.normpath(posixpath.join("IHE_XDM/SUBSET01", uri)).upper()
        info = members.get(path)
        if info is None or not path.startswith("IHE_XDM/"):
            raise XdmRefused("document-missing", "a document named in METADATA.XML is not in the archive")
        content = _read(zf, info)
        declared_hash = (slots.get("hash") or [""])[0].lower()
        if declared_hash and declared_hash != hashlib.sha1(content).hexdigest():  # XDS metadata hashes are SHA-1
            raise XdmRefused("document-hash-mismatch", "a document does not match its declared hash")
        codes: dict[str, str] = {}
        author: dict[str, list[str]] = {}
        for c in _classifications(root, entry):
            scheme = c.get("classificationScheme", "")
            if scheme in CODES:
                coding = (_slots(c).get("codingScheme") or [""])[0]
                codes[CODES[scheme]] = c.get("nodeRepresentation", "")
                codes[CODES[scheme] + "Scheme"] = coding
                codes[CODES[scheme] + "DisplayName"] = _name(c)
            elif scheme == AUTHOR:
                author = _slots(c)
        ids = _external_ids(entry)
        patient, authority = split_cx(ids.get(DOC_PATIENT_ID, "")) if ids.get(DOC_PATIENT_ID) else ("", "")
        for item in slots.get("sourcePatientInfo", []):
            key, _, value = item.partition("|")
            source_info.setdefault(key, value)
        metadata: dict[str, Any] = {
            **codes,
            "title": _name(entry),
            "uniqueId": ids.get(DOC_UNIQUE_ID, ""),
            "creationTime": (slots.get("creationTime") or [""])[0],
            "languageCode": (slots.get("languageCode") or [""])[0],
            "authorInstitution": author.get("authorInstitution", []),
            "authorSpecialty": author.get("authorSpecialty", []),
        }
        documents.append(
            XdmDocument(
                entry_id=entry.get("id", ""),
                filename=posixpath.basename(uri),
                mime_type=entry.get("mimeType", "application/octet-stream"),
                data=content,
                patient_id=patient,
                patient_id_authority=authority,
                class_code=codes.get("classCode", ""),
                type_code=codes.get("typeCode", ""),
                author=(author.get("authorPerson") or [""])[0],
                confidentiality=codes.get("confidentialityCode", ""),
                metadata=metadata,
            )
        )
    return XdmArchive(set_patient, set_authority, documents, source_info)
