"""Study assembly: instances group by StudyInstanceUID; a study with no new instance for the
quiet period is complete -> `StudyCompleted` on the study's own stream.

A log follower: the instance rows, the study rows, the events and the position commit
together through the one writer, so each completion is recorded exactly once across restarts.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog

from engine.follower import LogFollower
from engine.ingest import Appendix, Writer
from event_store import EventStore
from event_store.events import StudyCompleted
from event_store.store import payload_ref

__all__ = ["MANIFEST_TYPE", "StudyAssembler", "study_stream"]

log = structlog.get_logger("relais.studies")

MANIFEST_TYPE = "application/x-relais-study-manifest+json"

TABLES = [
    """CREATE TABLE IF NOT EXISTS relais_dicom_instances (
        position BIGINT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, message_id TEXT NOT NULL,
        sha256 TEXT NOT NULL, size BIGINT NOT NULL, facts TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_dicom_instances_study ON relais_dicom_instances (study_uid)",
    """CREATE TABLE IF NOT EXISTS relais_dicom_studies (
        study_uid TEXT PRIMARY KEY, last_received_at TEXT NOT NULL, last_position BIGINT NOT NULL,
        completed_position BIGINT NOT NULL, pending INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS relais_dicom_studies_pending ON relais_dicom_studies (pending, last_received_at)",
]
INSERT_INSTANCE = "INSERT INTO relais_dicom_instances VALUES (?,?,?,?,?,?,?,?,?)"
UPSERT_STUDY = (
    "INSERT INTO relais_dicom_studies VALUES (?,?,?,0,1) ON CONFLICT (study_uid) DO UPDATE SET "
    "last_received_at = excluded.last_received_at, last_position = excluded.last_position, pending = 1"
)
MARK_COMPLETED = "UPDATE relais_dicom_studies SET completed_position = ?, pending = 0 WHERE study_uid = ?"
DUE_STUDIES = (
    "SELECT study_uid, last_position FROM relais_dicom_studies "
    "WHERE pending = 1 AND last_received_at <= ? ORDER BY last_position LIMIT 200"
)
_NAMESPACE = uuid.UUID("6f1b7a2e-2f8e-4d7c-9a53-2b1f5e0c9d41")


def study_stream(study_uid: str) -> uuid.UUID:
    """The stream of a study's own events (completions, routing, deliveries)."""
    return uuid.uuid5(_NAMESPACE, study_uid)


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds")


class StudyAssembler(LogFollower):
    name = "study-assembly"

    def __init__(self, store: EventStore, ingestor: Writer, quiet_period: float) -> None:
        super().__init__(store, ingestor)
        self.quiet_period = quiet_period
        tick = min(1.0, max(0.05, quiet_period / 4))
        # Work also comes from the clock (quiet periods ending): read at least every tick.
        self.wake_interval = tick
        self.idle_interval = min(tick, 0.1)  # not a store query after every commit of others
        self.min_interval = tick / 2  # do not double the writer's commits under load

    async def start(self) -> None:
        await asyncio.to_thread(self._create_tables)
        await super().start()

    def _create_tables(self) -> None:
        for sql in TABLES:
            self.store.execute(sql)

    def plan(self, after: int) -> tuple[Appendix, int]:
        """New instances into the study tables, then the studies whose quiet period is over."""
        appendix = Appendix()
        notes, position = self.select(after, ["relais.InstanceReceived"])
        fresh: set[str] = set()
        if notes:
            instances, studies = [], []
            for note in notes:
                e = self.store.decode(note).event
                study = e["study_instance_uid"]
                fresh.add(study)
                facts = {k: e.get(k, "") for k in ("modality", "calling_ae", "institution_name",
                                                  "referring_facility", "accession_number", "patient_id",
                                                  "issuer_of_patient_id")}  # fmt: skip
                instances.append((note.id, study, e["series_instance_uid"], e["sop_instance_uid"],
                                  e["sop_class_uid"], str(note.originator_id), e["sha256"], e["size"],
                                  json.dumps(facts)))  # fmt: skip
                studies.append((study, e["recorded_at"], note.id))
            appendix.statements += [(INSERT_INSTANCE, instances), (UPSERT_STUDY, studies)]
            self.track(appendix, position)
        cutoff = _iso(datetime.now(UTC) - timedelta(seconds=self.quiet_period))
        for row in self.store.query(DUE_STUDIES, [cutoff]):
            if row["study_uid"] in fresh:
                continue  # a new instance in this very batch: not quiet
            self._complete(appendix, row["study_uid"], int(row["last_position"]))
        return appendix, position

    def _complete(self, appendix: Appendix, study: str, last_position: int) -> None:
        rows = self.store.query(
            "SELECT * FROM relais_dicom_instances WHERE study_uid = ? AND position <= ? ORDER BY position",
            [study, last_position],
        )
        latest: dict[str, dict[str, Any]] = {}
        for r in rows:  # a new version of an instance replaces the earlier one
            latest[r["sop_instance_uid"]] = r
        series: dict[str, dict[str, Any]] = {}
        manifest: list[dict[str, Any]] = []
        values: dict[str, list[str]] = {}
        for r in latest.values():
            facts = json.loads(r["facts"])
            s = series.setdefault(
                r["series_uid"],
                {"series_instance_uid": r["series_uid"], "modality": facts["modality"], "instances": 0, "size": 0},
            )
            s["instances"] += 1
            s["size"] += int(r["size"])
            manifest.append({"sop_instance_uid": r["sop_instance_uid"], "sop_class_uid": r["sop_class_uid"],
                             "series_instance_uid": r["series_uid"], "message_id": r["message_id"],
                             "sha256": r["sha256"], "size": int(r["size"])})  # fmt: skip
            for key, value in facts.items():
                if value and value not in values.setdefault(key, []):
                    values[key].append(value)
        first = {k: v[0] for k, v in values.items()}
        metadata: dict[str, Any] = {
            "study_instance_uid": study,
            "modality": values.get("modality", []),
            "calling_ae": values.get("calling_ae", []),
            "institution_name": values.get("institution_name", []),
            "referring_facility": values.get("referring_facility", []),
            "accession_number": first.get("accession_number", ""),
            "sending_application": first.get("calling_ae", ""),
        }
        if first.get("patient_id"):
            metadata["patient_identifiers"] = [
                {"id": first["patient_id"], "authority": first.get("issuer_of_patient_id", ""), "type": "PI"}
            ]
        data = orjson.dumps(manifest)
        ref = payload_ref(data, MANIFEST_TYPE, self.store.inline_limit)
        total = sum(m["size"] for m in manifest)
        event = StudyCompleted(_iso(datetime.now(UTC)), study, list(series.values()), len(manifest), total,
                               metadata, ref, last_position)  # fmt: skip
        appendix.events.append((study_stream(study), event))
        appendix.payloads.append((ref, data))
        appendix.statements.append((MARK_COMPLETED, [(last_position, study)]))

    def committed(self, appendix: Appendix) -> None:
        for stream, event in appendix.events:
            if isinstance(event, StudyCompleted):
                log.info("study_completed", stream=str(stream), instances=event.instances, size=event.size)
