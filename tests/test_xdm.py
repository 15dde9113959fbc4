"""IHE XDM archives read defensively: documents and their metadata out, unsafe archives
refused with a stable code (zip bombs, path traversal, nested archives...)."""

from __future__ import annotations

import io
import zipfile

import pytest

from connectors.xdm import XdmLimits, XdmRefused, read_xdm
from engine.mail_intake import read_submission
from tests.mail_samples import INS, Doc, Mail, cda, metadata_xml, xdm_zip


def refused(data: bytes, limits: XdmLimits | None = None) -> str:
    with pytest.raises(XdmRefused) as caught:
        read_xdm(data, limits)
    return caught.value.code


def raw_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out.getvalue()


def test_documents_and_their_metadata_come_out_of_an_ihe_archive() -> None:
    pdf = b"%PDF-1.4 compte rendu"
    second_doc = Doc(filename="DOC0002.PDF", mime_type="application/pdf", data=pdf, type_code="11502-2",
                     confidentiality="R")  # fmt: skip
    archive = read_xdm(xdm_zip([Doc(data=cda()), second_doc]))
    assert (archive.patient_id, archive.patient_id_authority) == (INS, "1.2.250.1.213.1.4.8")
    first, second = archive.documents
    assert (first.filename, first.mime_type, first.data) == ("DOC0001.XML", "text/xml", cda())
    assert (first.class_code, first.type_code, first.confidentiality) == ("10", "11490-0", "N")
    assert first.author.startswith("801234567897^MARTIN")
    assert first.metadata["typeCodeScheme"] == "2.16.840.1.113883.6.1"
    assert first.metadata["uniqueId"] == "1.2.250.1.999.1" and first.metadata["creationTime"] == "20261124101500"
    assert (second.data, second.type_code, second.confidentiality) == (pdf, "11502-2", "R")
    assert archive.source_patient_info["PID-7"] == "19800101"


def test_not_a_zip_is_refused() -> None:
    assert refused(b"this is not a zip") == "zip-unreadable"
    assert refused(xdm_zip()[:200]) == "zip-unreadable"  # truncated


def test_zip_bomb_is_refused_before_inflating() -> None:
    bomb = raw_zip({"IHE_XDM/SUBSET01/METADATA.XML": metadata_xml([]), "IHE_XDM/SUBSET01/BIG.XML": b"\0" * 20_000_000})
    assert refused(bomb) == "zip-bomb"
    assert refused(xdm_zip(extra={"IHE_XDM/SUBSET01/PAD.TXT": b"a" * 5000}), XdmLimits(max_total_bytes=4000)) == (
        "zip-too-large"
    )


def test_path_traversal_and_absolute_paths_are_refused() -> None:
    assert refused(xdm_zip(extra={"../../etc/cron.d/evil": b"x"})) == "zip-unsafe-path"
    assert refused(xdm_zip(extra={"IHE_XDM/../../evil": b"x"})) == "zip-unsafe-path"
    assert refused(xdm_zip(extra={"/etc/passwd": b"x"})) == "zip-unsafe-path"
    assert refused(xdm_zip(extra={"C:\\windows\\evil.dll": b"x"})) == "zip-unsafe-path"


def test_nested_archives_are_refused() -> None:
    assert refused(xdm_zip(extra={"IHE_XDM/SUBSET01/INNER.ZIP": xdm_zip()})) == "zip-nested-archive"
    disguised = Doc(filename="DOC0002.XML", data=xdm_zip())  # a zip under an innocent name
    assert refused(xdm_zip([Doc(data=cda()), disguised])) == "zip-nested-archive"


def test_too_many_members_are_refused() -> None:
    extra = {f"IHE_XDM/SUBSET01/F{i}.TXT": b"x" for i in range(20)}
    assert refused(xdm_zip(extra=extra), XdmLimits(max_members=10)) == "zip-too-many-members"


def test_metadata_missing_unreadable_or_with_entities_is_refused() -> None:
    no_metadata = raw_zip({"README.TXT": b"hello", "IHE_XDM/SUBSET01/DOC0001.XML": cda()})
    assert refused(no_metadata) == "metadata-missing"
    assert refused(xdm_zip(metadata=b"<not xml")) == "metadata-unreadable"
    laughs = b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><lolz>&lol;</lolz>'
    assert refused(xdm_zip(metadata=laughs)) == "metadata-unreadable"


def test_a_document_missing_or_not_matching_its_hash_is_refused() -> None:
    listed_only = metadata_xml([Doc(filename="GHOST.XML", data=b"x")])
    assert refused(xdm_zip([Doc(data=cda())], metadata=listed_only)) == "document-missing"
    assert refused(xdm_zip([Doc(data=cda(), hash_override="0" * 40)])) == "document-hash-mismatch"


def test_mail_reading_reports_ins_problems_with_mdn_codes() -> None:
    def failure(mail: Mail, recipients: list[str] | None = None) -> str | None:
        reading = read_submission(mail.bytes(), recipients or mail.to, 256 * 1024)
        return reading.failure[0] if reading.failure else None

    assert failure(Mail(xdm=xdm_zip())) is None
    assert failure(Mail(xdm=xdm_zip([Doc(data=cda(), patient_id="")], set_patient=None))) == "INS-MISSING"
    assert failure(Mail(xdm=xdm_zip([Doc(data=cda(birth="19990101"))]))) == "INS-MISMATCH"
    assert failure(Mail(xdm=xdm_zip([Doc(data=cda(), patient_id="180000000000000")]))) == "INS-MISMATCH"
    assert failure(Mail(xdm=xdm_zip()), ["100000000000000@patient.mssante.fr"]) == "INS-MISMATCH"
    assert failure(Mail(xdm=b"PK\x03\x04 broken")) == "XDM-UNREADABLE"
    assert failure(Mail(headers={"X-MSS-INS": "O"})) == "INS-MISSING"  # says INS, carries none
    assert failure(Mail(headers={"X-MSS-INS": "N"})) is None
