"""One writing process per store: the hash chain's head lives in the writer's memory.

SQLite: an exclusive `flock` on `<database>.writer`; PostgreSQL: a session advisory lock.
A second engine on the same store is refused at start with a clear error, while any
number of readers (the CLI) may come and go.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["StoreBusy", "WriterLock"]

_PG_LOCK_KEY = 0x52454C41  # "RELA"


class StoreBusy(RuntimeError):
    """Another Relais process already writes this store."""


class WriterLock:
    def __init__(self, release: Any) -> None:
        self._release = release

    @classmethod
    def acquire(cls, url: str) -> WriterLock:
        parsed = urlparse(url)
        if parsed.scheme == "sqlite":
            path = Path(unquote(url[len("sqlite:///") :]) + ".writer")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StoreBusy(
                    f"another Relais process (pid {holder}) is already writing {path.with_suffix('')}"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

            def release_file() -> None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

            return cls(release_file)
        import psycopg

        conn = psycopg.connect(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            dbname=(parsed.path or "/").lstrip("/") or "postgres",
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            autocommit=True,
        )
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_PG_LOCK_KEY,)).fetchone()
        if not row or not row[0]:
            conn.close()
            raise StoreBusy(f"another Relais process is already writing the PostgreSQL store {parsed.path}")
        return cls(conn.close)

    def release(self) -> None:
        self._release()
