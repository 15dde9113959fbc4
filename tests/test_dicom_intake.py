"""The DICOM listener with clients we did not write: DCMTK echoscu/storescu and pynetdicom's SCU.
Success only after the instance is durable; duplicates, new versions and refusals are recorded."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import wait_for
from tests.dicom_files import SAMPLES, dcmtk, dicom_listeners, sample


def topics(store: Any) -> list[str]:
    return [e.topic for e in store.read_log()]


def scu(port: int, calling: str = "MODALITY", called: str = "RELAIS") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    return assoc


def test_echoscu_gets_success(relais) -> None:
    running = relais(listeners=dicom_listeners())
    done = dcmtk("echoscu", "-aec", "RELAIS", "127.0.0.1", running.app.port_of("dicom"))
    assert done.returncode == 0, done.stderr


def test_storescu_instances_are_stored_with_their_identifiers(relais, tmp_path: Path) -> None:
    """CT, MR and its RLE / JPEG 2000 variants, JPEG, a multi-frame US and an SR, in one
    association, each in the transfer syntax it was written in."""
    running = relais(listeners=dicom_listeners())
    study = generate_uid()
    files = [sample(name, tmp_path / "in", study_uid=study, AccessionNumber="ACC42") for name in SAMPLES]
    port = running.app.port_of("dicom")
    # storescu proposes one compressed transfer syntax per run (and converts nothing): one run
    # per kind, so each file travels in the syntax it was written in.
    proposal = {"1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.50": "-xy"}
    runs: dict[str, list[Path]] = {}
    for path in files:
        runs.setdefault(proposal.get(dcmread(path).file_meta.TransferSyntaxUID, "-xe"), []).append(path)
    for option, group in runs.items():
        done = dcmtk("storescu", "-R", option, "-aet", "MODALITY", "-aec", "RELAIS", "127.0.0.1", port, *group)
        assert done.returncode == 0, done.stderr
    store = running.store
    received = [e for e in store.read_log() if e.topic == "relais.InstanceReceived"]
    assert len(received) == len(files)
    by_uid = {e.event["sop_instance_uid"]: e for e in received}
    for path in files:
        original = dcmread(path)
        event = by_uid[original.SOPInstanceUID].event
        assert event["study_instance_uid"] == study
        assert event["series_instance_uid"] == original.SeriesInstanceUID
        assert event["patient_id"] == "IPP12345" and event["accession_number"] == "ACC42"
        assert event["calling_ae"] == "MODALITY" and event["modality"] == original.Modality
        assert event["transfer_syntax"] == original.file_meta.TransferSyntaxUID
        stored = dcmread(io.BytesIO(store.payload(event["sha256"])))
        if "PixelData" in original:
            assert stored.PixelData == original.PixelData
        else:
            assert stored.ContentSequence == original.ContentSequence


def test_pynetdicom_resend_is_a_duplicate_and_other_content_a_flagged_version(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    path = sample("CT_small.dcm", tmp_path)
    ds = dcmread(path)
    assoc = scu(running.app.port_of("dicom"))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # resent after a lost response
        ds.SeriesDescription = "corrected"
        assert assoc.send_c_store(ds).Status == 0x0000  # same SOP Instance UID, other content
    finally:
        assoc.release()
    store = running.store
    assert topics(store).count("relais.InstanceReceived") == 2
    assert topics(store).count("relais.DuplicateReceived") == 1
    flags = [e.event["flags"] for e in store.read_log() if e.topic == "relais.MessageReceived"]
    assert flags == [[], ["control_id_reused"]]
    assert store.query("SELECT DISTINCT status, ack_code FROM relais_messages") == [
        {"status": "accepted", "ack_code": "0000"}
    ]


def _send_file(port: int, path: Path) -> int:
    """Send a file's bytes as they are (the file meta names the SOP class and instance)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = scu(port)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


def test_dataset_that_does_not_match_its_request_gets_A900_and_is_recorded(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    path = sample("CT_small.dcm", tmp_path)
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request will name another instance
    ds.save_as(path)
    assert _send_file(running.app.port_of("dicom"), path) == 0xA900
    store = running.store
    assert topics(store) == ["relais.MessageReceived", "relais.MessageRejected"]
    rejected = store.query("SELECT status, ack_code FROM relais_messages")
    assert rejected == [{"status": "reject", "ack_code": "A900"}]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the junk it reads
def test_unreadable_dataset_gets_cannot_understand(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    path = sample("CT_small.dcm", tmp_path)
    raw = path.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")  # after the file meta group
    port = running.app.port_of("dicom")
    for junk in (b"\x08\x00\x16\x00ZZ\x04\x00abcd", b"\x08\x00\x16\x00UI\xff\x7f" + b"junk" * 10, b"\xff" * 50):
        path.write_bytes(raw[:meta_end] + junk)  # no VR like that; a length past the end; noise
        assert _send_file(port, path) == 0xC000
    assert topics(running.store).count("relais.MessageRejected") == 3


def test_store_down_answers_out_of_resources_and_stores_nothing(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    assert running.app.ingestor is not None
    running.loop_call(running.app.ingestor.stop())  # the writer is gone: nothing can commit
    ds = dcmread(sample("CT_small.dcm", tmp_path))
    assoc = scu(running.app.port_of("dicom"))
    try:
        assert assoc.send_c_store(ds).Status == 0xA700
    finally:
        assoc.release()
    assert topics(running.store) == []


def test_unknown_calling_ae_title_is_refused(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(allowed_calling_aets=["MODALITY"]))
    port = running.app.port_of("dicom")
    refused = scu(port, calling="INTRUDER")
    assert refused.is_rejected
    # The refusal is on record: who called, what they were told, the request they sent.
    (row,) = running.store.query(
        "SELECT message_id, sender, ack_code, error_code, reason FROM relais_messages WHERE status = 'reject'"
    )
    assert (row["sender"], row["ack_code"], row["error_code"]) == ("INTRUDER", "A-ASSOCIATE-RJ", "1-1-3")
    events = running.store.events_of(uuid.UUID(row["message_id"]))
    assert [e.topic for e in events] == ["relais.MessageReceived", "relais.MessageRejected"]
    assert events[0].event["metadata"]["calling_ae"] == "INTRUDER"
    assert b"INTRUDER" in running.store.payload(events[0].event["payload"]["sha256"])
    done = dcmtk("echoscu", "-aet", "MODALITY", "-aec", "RELAIS", "127.0.0.1", port)
    assert done.returncode == 0, done.stderr


def test_peer_outside_allowed_networks_is_dropped(relais) -> None:
    running = relais(listeners=dicom_listeners(allowed_peers=["10.0.0.0/8"]))
    done = dcmtk("echoscu", "-to", "5", "-aec", "RELAIS", "127.0.0.1", running.app.port_of("dicom"))
    assert done.returncode != 0


def test_wrong_called_ae_title_is_refused(relais) -> None:
    running = relais(listeners=dicom_listeners())
    assoc = scu(running.app.port_of("dicom"), called="WRONG")
    assert not assoc.is_established


def test_tls_listener_stores_from_a_client_with_a_certificate(relais, tmp_path: Path) -> None:
    import ssl

    from tests.tls_material import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca),
           "require_client_cert": True}  # fmt: skip
    running = relais(listeners=dicom_listeners(tls=tls))
    port = running.app.port_of("dicom")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    ds = dcmread(sample("CT_small.dcm", tmp_path))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RELAIS", tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert topics(running.store).count("relais.InstanceReceived") == 1
    plain = dcmtk("echoscu", "-to", "5", "-aec", "RELAIS", "127.0.0.1", port)  # no TLS: no association
    assert plain.returncode != 0


def test_a_silent_connection_does_not_hold_the_tls_listener(relais, tmp_path: Path) -> None:
    import socket
    import ssl

    from tests.tls_material import make_pki

    pki = make_pki(tmp_path / "pki")
    running = relais(listeners=dicom_listeners(tls={"cert": str(pki.server_cert), "key": str(pki.server_key)}))
    port = running.app.port_of("dicom")
    with socket.create_connection(("127.0.0.1", port)):  # connects, never says a word
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="RELAIS", tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_spool_left_by_a_dead_process_is_removed_at_start(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners())
    spool = running.store.blobs.spool
    blob_dir = running.config.resolve(running.config.store.blob_dir)
    running.stop()
    abandoned = spool / "0123abcd.999999999.dcm"  # no such process
    abandoned.write_bytes(b"half an instance")
    again = relais(listeners=dicom_listeners(), store={"url": f"sqlite:///{blob_dir.parent / 'relais.db'}",
                                                       "blob_dir": str(blob_dir)})  # fmt: skip
    assert not abandoned.exists()
    assert again.app.port_of("dicom")


def test_connection_cut_mid_dataset_stores_nothing_and_the_listener_goes_on(relais, tmp_path: Path) -> None:
    import socket

    from pynetdicom import evt

    running = relais(listeners=dicom_listeners(max_pdu=131072))
    port = running.app.port_of("dicom")
    big = dcmread(sample("examples_ybr_color.dcm", tmp_path))  # ~225 KB: two P-DATA PDUs of 128 KB
    sent = []

    def cut_after_a_few(event: Any) -> None:  # association request, command, first half of the data
        sent.append(1)
        if len(sent) == 3:
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(big.SOPClassUID, big.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RELAIS", evt_handlers=[(evt.EVT_PDU_SENT, cut_after_a_few)])
    assert assoc.is_established
    try:
        assoc.send_c_store(big)
    except Exception:
        pass
    assoc.abort()
    spool = running.store.blobs.spool  # holds empty files made ahead for the next datasets
    assert wait_for(lambda: all(p.stat().st_size == 0 for p in spool.iterdir()), "the partial dataset to go")
    # Kept as refused with the bytes that came (its start), not as an instance.
    assert wait_for(lambda: topics(running.store) == ["relais.MessageReceived", "relais.MessageRejected"],
                    "the cut dataset to be recorded")  # fmt: skip
    (row,) = running.store.query("SELECT trigger_event, ack_code, reason, payload_sha256 FROM relais_messages")
    assert (row["trigger_event"], row["ack_code"]) == ("C-STORE", "none")
    assert "dataset cut after" in row["reason"] and "connection lost" in row["reason"]
    assert running.store.payload(row["payload_sha256"])[128:132] == b"DICM"  # the file meta and what followed
    done = dcmtk("storescu", "-aec", "RELAIS", "127.0.0.1", port, sample("CT_small.dcm", tmp_path))
    assert done.returncode == 0, done.stderr
    assert topics(running.store).count("relais.InstanceReceived") == 1


def test_dicom_listener_settings_are_checked_at_load(tmp_path: Path) -> None:
    from engine.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text('[[listeners.dicom]]\nname = "dicom"\nmax_pdu = 16384\n', encoding="utf-8")
    expected = r"listeners\.dicom\[0\]\.max_pdu: Input should be greater than or equal to 131072"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    path.write_text('[[listeners.mllp]]\nname = "edge"\n[[listeners.dicom]]\nname = "edge"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="listener names must be unique"):
        load_config(path)
