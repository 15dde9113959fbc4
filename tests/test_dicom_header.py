"""The header walker reads what pydicom reads, on every bundled pydicom file it accepts."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import pydicom
from pydicom import dcmread

from engine.dicom_header import WANTED, scan_header


def test_header_walker_agrees_with_pydicom() -> None:
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    compared = 0
    for name in sorted(glob.glob(str(folder / "*.dcm"))):
        path = Path(name)
        found = scan_header(path)
        if found is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True, force=True)
        expected = {kw: str(ds.get(kw, "") or "").strip() for kw in WANTED.values()}
        assert found == expected, os.path.basename(name)
        compared += 1
    assert compared > 20


def test_header_walker_gives_up_on_what_it_does_not_handle(tmp_path: Path) -> None:
    big_endian = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small_bigendian.dcm"
    assert scan_header(big_endian) is None
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    assert scan_header(junk) is None
    assert scan_header(tmp_path / "junk.dcm", limit=10) is None
