"""Content-addressed blob folder for large payloads (DICOM instances, mails).

A blob is written to a temporary file, fsynced, renamed to its SHA-256 and its folder
fsynced, so a blob named in a committed event is always whole on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BlobStore", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        _make_dirs_durably(root)

    def incomplete_writes(self) -> list[Path]:
        """Temporary files of writes that never finished, and spooled payloads never adopted
        (never acknowledged either): their writer process, named in the file name, is gone."""
        stale = []
        for path in (*self.root.glob("??/??/.*.tmp"), *self.root.glob("spool/*.*.*")):
            pid = path.name.rsplit(".", 2)[-2]
            if not (pid.isdigit() and _process_alive(int(pid))):
                stale.append(path)
        return stale

    def remove_incomplete_writes(self) -> int:
        """Delete what a killed writer left half-written; returns how many files went."""
        removed = 0
        for path in self.incomplete_writes():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        """Store `data` durably under its hash (no-op when already there)."""
        final = self.path_of(sha256)
        if final.exists():
            return
        _make_dirs_durably(final.parent)
        tmp = final.with_name(f".{sha256}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    @property
    def spool(self) -> Path:
        """Where an edge writes a large incoming payload before `adopt` (same file system,
        so adopting is a rename, never a copy), as `<name>.<pid>.<suffix>`: what a dead
        process left there is an incomplete write."""
        path = self.root / "spool"
        _make_dirs_durably(path)
        return path

    def adopt(self, spooled: Path) -> tuple[str, int]:
        """Make a spooled file a durable blob under its hash; returns (sha256, size).

        The file is read once to hash it, fsynced, renamed into place (or dropped when the
        same content is already stored) and its folder fsynced."""
        digest = hashlib.sha256()
        size = 0
        fd = os.open(spooled, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        sha256 = digest.hexdigest()
        final = self.path_of(sha256)
        if final.exists():
            spooled.unlink()
            return sha256, size
        _make_dirs_durably(final.parent)
        os.replace(spooled, final)
        _fsync_dir(final.parent)
        return sha256, size

    def get(self, sha256: str) -> bytes:
        return self.path_of(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    def hashes(self) -> Iterator[str]:
        """Every complete blob in the folder (temporary files are skipped)."""
        for path in self.root.glob("??/??/*"):
            if not path.name.startswith("."):
                yield path.name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entries changed, so the path survives a power cut."""
    if path.is_dir():
        return
    _make_dirs_durably(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
