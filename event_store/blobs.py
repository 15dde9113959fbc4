"""Content-addressed blob folder for large payloads (DICOM instances, mails).

A blob is written to a temporary file, fsynced, renamed to its SHA-256 and its folder
fsynced (`put`), or spooled by an edge, placed under its hash and synced in a worker
thread that the commit naming it waits for (`place`): a blob named in a committed event
is always whole on disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["BlobStore", "incomplete_writes", "remove_incomplete_writes", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        _make_dirs_durably(root)
        # One level of 256 folders made once: a new blob never waits for a mkdir (a new
        # inode and two more fsyncs, ~1 ms here) as it did with 65,536 folders on two levels.
        missing = [root / f"{i:02x}" for i in range(256) if not (root / f"{i:02x}").is_dir()]
        for folder in missing:
            folder.mkdir(exist_ok=True)
            _fsync_dir(folder)
        if missing:
            _fsync_dir(root)
        # Placed blobs are synced in parallel: the file system commits its journal for several.
        self._fsyncs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-fsync")

    def close(self) -> None:
        self._fsyncs.shutdown(wait=True)

    def incomplete_writes(self) -> list[Path]:
        return incomplete_writes(self.root)

    def remove_incomplete_writes(self) -> int:
        return remove_incomplete_writes(self.root)

    def path_of(self, sha256: str) -> Path:
        """Where a blob is stored; one stored by an earlier Relais (two folder levels) is
        found where it was."""
        path = self.root / sha256[:2] / sha256
        if not path.exists():
            earlier = self.root / sha256[:2] / sha256[2:4] / sha256
            if earlier.exists():
                return earlier
        return path

    def _new_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        """Store `data` durably under its hash. A same-named file is kept (and synced) only
        if it holds these bytes (see `place`)."""
        final = self._new_path(sha256)
        if _holds(final, sha256):
            _fsync_dir(final)
            _fsync_dir(final.parent)
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
            _release_pages(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    @property
    def spool(self) -> Path:
        """Where an edge writes a large incoming payload before `place` (same file system,
        so placing is a rename, never a copy), as `<name>.<pid>.<suffix>`: what a dead
        process left there is an incomplete write."""
        path = self.root / "spool"
        _make_dirs_durably(path)
        return path

    def place(self, spooled: Path, sha256: str) -> Future[None]:
        """Move a spooled file whose SHA-256 its writer computed to its place, and start making
        it durable (fsync of the file and of its folder) in worker threads: the commit that
        names it waits for the returned future, while other work (earlier commits, the next
        instances) goes on. A same-named file is kept if it holds these bytes (a committed blob
        is never swapped for an unsynced copy) and replaced otherwise: it is then what a crash
        left of a placement that was never synced, and was never named by a commit."""
        final = self._new_path(sha256)
        if _holds(final, sha256):
            spooled.unlink()
        else:
            _make_dirs_durably(final.parent)
            os.replace(spooled, final)
        # Both at once: on a journaling file system they then share one journal commit.
        return _all_of([self._fsyncs.submit(_sync_file, final), self._fsyncs.submit(_fsync_dir, final.parent)])

    def get(self, sha256: str) -> bytes:
        return self.path_of(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    def hashes(self) -> Iterator[str]:
        """Every complete blob in the folder (temporary files are skipped)."""
        for path in (*self.root.glob("??/*"), *self.root.glob("??/??/*")):
            if len(path.name) == 64 and not path.name.startswith("."):
                yield path.name


def _holds(path: Path, sha256: str) -> bool:
    """Whether the file exists and its bytes hash to `sha256` (read only for a resend)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return False
    return digest.hexdigest() == sha256


def _all_of(futures: list[Future[None]]) -> Future[None]:
    """A future done when all of `futures` are, failed with the first failure among them."""
    combined: Future[None] = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(future: Future[None]) -> None:
        error = future.exception()
        with lock:
            left[0] -= 1
            if combined.done():
                return
            if error is not None:
                combined.set_exception(error)
            elif left[0] == 0:
                combined.set_result(None)

    for future in futures:
        future.add_done_callback(one_done)
    return combined


def _sync_file(path: Path) -> None:
    """fsync a blob file, then let the kernel drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        _release_pages(fd)
    finally:
        os.close(fd)


def _release_pages(fd: int) -> None:
    """A blob is written once and read rarely (a forward, an audit): once synced, its cached
    pages only push other data out. Handing them back also makes the next write cheap: on a
    VM, writing 0.5 MB into pages the kernel takes fresh costs ~1.1 ms here, into pages it
    just got back ~0.07 ms (bench/RESULTS.md §18)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _fsync_dir(path: Path) -> None:  # a file or a folder
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


def incomplete_writes(root: Path) -> list[Path]:
    """Temporary files of writes that never finished, and spooled payloads never placed
    (never acknowledged either) under a blob folder: their writer process, named in the file
    name, is gone."""
    stale = []
    temporary = (*root.glob("??/.*.tmp"), *root.glob("??/??/.*.tmp"))
    for path in (*temporary, *root.glob("spool/*.*.*")):
        pid = path.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and _process_alive(int(pid))):
            stale.append(path)
    return stale


def remove_incomplete_writes(root: Path) -> int:
    """Delete what a killed writer left half-written; returns how many files went."""
    removed = 0
    for path in incomplete_writes(root):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
