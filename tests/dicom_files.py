"""DICOM test data: pydicom's bundled files copied with new UIDs, and a Relais with a DICOM listener."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# Image, compressed variants, a multi-frame ultrasound and a structured report.
SAMPLES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "reportsi.dcm",
]  # fmt: skip


def sample(
    name: str,
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "IPP12345",
    **attributes: Any,
) -> Path:
    """A copy of a bundled pydicom file under `folder` with new (or the given) UIDs."""
    source = get_testdata_file(name)
    assert source is not None, name
    ds = dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    for key, value in attributes.items():
        setattr(ds, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_listeners(**listener: Any) -> dict[str, Any]:
    """`listeners` for make_config: no MLLP, one DICOM listener on a free port."""
    return {"mllp": [], "dicom": [{"name": "dicom", "port": 0, **listener}]}


def dcmtk(tool: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY (DCMTK sets it only when asked by this variable)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
