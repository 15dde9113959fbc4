"""Forwarding: a completed study that a channel takes (filters on study metadata) is sent by
C-STORE to another node, through the outbox, with the patient ID of the receiver's domain."""

from __future__ import annotations

import io
import socket
import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import wait_for
from tests.dicom_files import dcmtk, dicom_listeners, sample

CHANNEL = """
name = "ct-to-chu-b"
[source]
kinds = ["dicom-study"]
[filter]
all = [{{ metadata = "modality", equals = "CT" }}, {{ metadata = "calling_ae", equals = "CT_CHU_A" }}]
[[destination]]
name = "chu-b"
type = "dicom"
backoff_initial = 0.2
backoff_max = 0.5
[destination.settings]
host = "127.0.0.1"
port = {port}
called_ae = "CHU_B"
issuer_of_patient_id = "CHU_B"
[destination.settings.patient_id_map]
IPP12345 = "B-777"
"""


def hub_with_channel(relais: Any, tmp_path: Path, receiver_port: int) -> Any:
    routes = tmp_path / "routes"
    routes.mkdir(exist_ok=True)
    (routes / "ct.toml").write_text(CHANNEL.format(port=receiver_port), encoding="utf-8")
    return relais(
        listeners=dicom_listeners(),
        dicom={"study_quiet_period": 0.3},
        routing={"enabled": True, "routes_dir": str(routes)},
    )


def study_topics(running: Any) -> list[str]:
    return [e.topic for e in running.store.read_log() if e.topic not in ("relais.MessageReceived",
                                                                            "relais.InstanceReceived")]  # fmt: skip


def send(running: Any, *files: Path, calling: str = "CT_CHU_A") -> None:
    done = dcmtk("storescu", "-aet", calling, "-aec", "RELAIS", "127.0.0.1", running.app.port_of("dicom"), *files)
    assert done.returncode == 0, done.stderr


def test_ct_study_is_forwarded_with_the_receivers_patient_id(relais, tmp_path: Path) -> None:
    receiver = relais(listeners=dicom_listeners(ae_title="CHU_B"))
    hub = hub_with_channel(relais, tmp_path, receiver.app.port_of("dicom"))
    study = generate_uid()
    files = [sample("CT_small.dcm", tmp_path / "in", study_uid=study) for _ in range(3)]
    send(hub, *files)
    wait_for(lambda: "relais.Delivered" in study_topics(hub))
    assert study_topics(hub) == ["relais.StudyCompleted", "relais.MessageRouted", "relais.DeliveryAttempted",
                                 "relais.Delivered"]  # fmt: skip
    got = [e.event for e in receiver.store.read_log() if e.topic == "relais.InstanceReceived"]
    assert sorted(g["sop_instance_uid"] for g in got) == sorted(p.stem for p in files)
    assert {g["patient_id"] for g in got} == {"B-777"} and {g["issuer_of_patient_id"] for g in got} == {"CHU_B"}
    for g in got:
        original = dcmread(tmp_path / "in" / f"{g['sop_instance_uid']}.dcm")
        forwarded = dcmread(io.BytesIO(receiver.store.payload(g["sha256"])))
        assert forwarded.PixelData == original.PixelData
        assert forwarded.StudyInstanceUID == study


def test_study_the_filters_refuse_is_not_routed(relais, tmp_path: Path) -> None:
    receiver = relais(listeners=dicom_listeners(ae_title="CHU_B"))
    hub = hub_with_channel(relais, tmp_path, receiver.app.port_of("dicom"))
    send(hub, sample("MR_small.dcm", tmp_path))
    send(hub, sample("CT_small.dcm", tmp_path), calling="OTHER_AE")
    wait_for(lambda: study_topics(hub).count("relais.NotRouted") == 2)
    not_routed = [e.event for e in hub.store.read_log() if e.topic == "relais.NotRouted"]
    assert all("ct-to-chu-b" in n["misses"] for n in not_routed)
    assert [e for e in receiver.store.read_log()] == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receiver_down_then_up_gets_the_study_after_retries(relais, tmp_path: Path) -> None:
    """DCMTK storescp as the receiver, started only after the first attempts failed."""
    port = free_port()
    hub = hub_with_channel(relais, tmp_path, port)
    study = generate_uid()
    files = [sample("CT_small.dcm", tmp_path / "in", study_uid=study) for _ in range(2)]
    send(hub, *files)
    wait_for(lambda: "relais.DeliveryFailed" in study_topics(hub))
    received = tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "CHU_B", "-od", str(received), str(port)],
                           env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    try:
        wait_for(lambda: "relais.Delivered" in study_topics(hub))
    finally:
        scp.terminate()
        scp.wait(10)
    assert "relais.DeadLettered" not in study_topics(hub)
    stored = {dcmread(p).SOPInstanceUID: dcmread(p) for p in received.iterdir()}
    assert sorted(stored) == sorted(p.stem for p in files)
    for path in files:
        assert stored[path.stem].PixelData == dcmread(path).PixelData
        assert stored[path.stem].PatientID == "B-777"


def test_patient_without_a_mapping_is_dead_lettered_when_the_route_says_fail(relais, tmp_path: Path) -> None:
    receiver = relais(listeners=dicom_listeners(ae_title="CHU_B"))
    routes = tmp_path / "routes"
    routes.mkdir()
    channel = CHANNEL.format(port=receiver.app.port_of("dicom")).replace(
        'issuer_of_patient_id = "CHU_B"', 'issuer_of_patient_id = "CHU_B"\nunmapped_patient = "fail"'
    )
    (routes / "ct.toml").write_text(channel, encoding="utf-8")
    hub = relais(listeners=dicom_listeners(), dicom={"study_quiet_period": 0.3},
                 routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    send(hub, sample("CT_small.dcm", tmp_path, patient_id="UNKNOWN-1"))
    wait_for(lambda: "relais.DeadLettered" in study_topics(hub))
    dead = [e.event for e in hub.store.read_log() if e.topic == "relais.DeadLettered"]
    assert dead[0]["attempt"] == 1 and "patient_id_map" in dead[0]["error"]
    assert "UNKNOWN-1" not in dead[0]["error"]  # no patient data in what operators read
    assert [e for e in receiver.store.read_log()] == []


def test_study_assembled_and_forwarded_on_a_postgresql_store(relais, tmp_path: Path, pg_url: str) -> None:
    receiver = relais(listeners=dicom_listeners(ae_title="CHU_B"))
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "ct.toml").write_text(CHANNEL.format(port=receiver.app.port_of("dicom")), encoding="utf-8")
    hub = relais(store={"url": pg_url, "blob_dir": "blobs"}, listeners=dicom_listeners(),
                 dicom={"study_quiet_period": 0.3}, routing={"enabled": True, "routes_dir": str(routes)})  # fmt: skip
    study = generate_uid()
    files = [sample("CT_small.dcm", tmp_path / "in", study_uid=study) for _ in range(2)]
    send(hub, *files)
    wait_for(lambda: "relais.Delivered" in study_topics(hub))
    completed = [e.event for e in hub.store.read_log() if e.topic == "relais.StudyCompleted"]
    assert [c["instances"] for c in completed] == [2]
    got = [e.event for e in receiver.store.read_log() if e.topic == "relais.InstanceReceived"]
    assert sorted(g["sop_instance_uid"] for g in got) == sorted(p.stem for p in files)
