"""Study assembly: instances group by StudyInstanceUID; after the quiet period the study is
complete (StudyCompleted, once, also across restarts), and completes again if more arrive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import wait_for
from tests.dicom_files import dcmtk, dicom_listeners, sample


def completions(running: Any) -> list[dict[str, Any]]:
    return [e.event for e in running.store.read_log() if e.topic == "relais.StudyCompleted"]


def store_files(running: Any, *files: Path) -> None:
    port = running.app.port_of("dicom")
    done = dcmtk("storescu", "-aet", "CT_CHU", "-aec", "RELAIS", "127.0.0.1", port, *files)
    assert done.returncode == 0, done.stderr


def test_a_quiet_study_completes_with_its_series_and_instances(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(), dicom={"study_quiet_period": 0.3})
    study, ct_series, mr_series = generate_uid(), generate_uid(), generate_uid()
    files = [sample("CT_small.dcm", tmp_path, study_uid=study, series_uid=ct_series) for _ in range(3)]
    files.append(sample("MR_small.dcm", tmp_path, study_uid=study, series_uid=mr_series))
    other = sample("CT_small.dcm", tmp_path)  # another study, completes on its own
    store_files(running, *files, other)
    wait_for(lambda: len(completions(running)) == 2)
    done = {c["study_instance_uid"]: c for c in completions(running)}
    completed = done[study]
    assert completed["instances"] == 4
    assert completed["size"] == sum(s["size"] for s in completed["series"])
    series = {s["series_instance_uid"]: s for s in completed["series"]}
    assert series[ct_series]["instances"] == 3 and series[ct_series]["modality"] == "CT"
    assert series[mr_series]["instances"] == 1 and series[mr_series]["modality"] == "MR"
    assert sorted(completed["metadata"]["modality"]) == ["CT", "MR"]
    assert completed["metadata"]["calling_ae"] == ["CT_CHU"]
    manifest = json.loads(running.store.payload(completed["manifest"]["sha256"]))
    assert sorted(m["sop_instance_uid"] for m in manifest) == sorted(p.stem for p in files)
    assert all(running.store.payload(m["sha256"]) for m in manifest)  # each stored, hash checked
    assert [c["instances"] for uid, c in done.items() if uid != study] == [1]


def test_instances_after_completion_complete_the_study_again(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(), dicom={"study_quiet_period": 0.3})
    study = generate_uid()
    store_files(running, sample("CT_small.dcm", tmp_path, study_uid=study))
    wait_for(lambda: completions(running))
    store_files(running, sample("CT_small.dcm", tmp_path, study_uid=study))
    wait_for(lambda: len(completions(running)) == 2)
    assert [c["instances"] for c in completions(running)] == [1, 2]


def test_resent_instance_does_not_reopen_a_completed_study(relais, tmp_path: Path) -> None:
    running = relais(listeners=dicom_listeners(), dicom={"study_quiet_period": 0.3})
    path = sample("CT_small.dcm", tmp_path)
    store_files(running, path)
    wait_for(lambda: completions(running))
    store_files(running, path)  # a duplicate: recorded, but nothing new in the study
    wait_for(lambda: "relais.DuplicateReceived" in [e.topic for e in running.store.read_log()])
    marker = sample("CT_small.dcm", tmp_path)  # another study: once it completes, the first had its chance
    store_files(running, marker)
    wait_for(lambda: len(completions(running)) == 2)
    first_study = dcmread(path).StudyInstanceUID
    assert [c["study_instance_uid"] for c in completions(running)].count(first_study) == 1


def test_completion_is_recorded_once_across_restarts(relais, tmp_path: Path) -> None:
    """Stopped inside the quiet period, the engine completes the study after its restart,
    and a second restart does not complete it again."""
    home = tmp_path / "relais0"

    def start() -> Any:
        return relais(
            listeners=dicom_listeners(),
            dicom={"study_quiet_period": 0.5},
            store={"url": f"sqlite:///{home / 'relais.db'}", "blob_dir": str(home / "blobs")},
        )

    first = start()
    study = generate_uid()
    store_files(first, *(sample("CT_small.dcm", tmp_path, study_uid=study) for _ in range(2)))
    first.stop()  # within the quiet period (or just after: the outcome must be the same)
    second = start()
    wait_for(lambda: len(completions(second)) == 1)
    second.stop()
    third = start()
    marker = sample("CT_small.dcm", tmp_path)  # once this one completes, the first had its chance
    store_files(third, marker)
    wait_for(lambda: len(completions(third)) == 2)
    assert [c["instances"] for c in completions(third) if c["study_instance_uid"] == study] == [2]


def test_followers_of_rare_events_read_past_hl7_traffic_without_recording_anything(relais, tmp_path: Path) -> None:
    """Study assembly and study routing follow InstanceReceived / StudyCompleted: under HL7
    traffic they move their position past the log head instead of scanning the whole log
    since their last match after every commit, and they commit nothing."""
    from tests.conftest import adt
    from tests.test_routing import send, topics

    (tmp_path / "routes").mkdir()
    running = relais(routing={"enabled": True, "routes_dir": str(tmp_path / "routes")})
    for i in range(5):
        assert send(running.port, adt("A01", control_id=f"RARE-{i}")) == "AA"
    assert wait_for(lambda: all("NotRouted" in topics(running, f"RARE-{i}") for i in range(5)))
    head = running.store.recorder.max_notification_id()
    studies, study_router = running.app.studies, running.app.study_router
    assert studies is not None and study_router is not None
    assert wait_for(lambda: studies.position >= head and study_router.position >= head)
    tracked = {r["name"] for r in running.store.query("SELECT name FROM relais_tracking")}
    assert "study-assembly" not in tracked and "study-router" not in tracked
