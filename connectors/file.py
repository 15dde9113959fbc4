"""Outbound file drop: write each delivery as one file in a folder, atomically and durably.
A temp file is written and fsynced, renamed into place, then the folder is fsynced."""

from __future__ import annotations

import asyncio
import os
import re
import string
import threading
import uuid
from pathlib import Path

import structlog

from connectors.destination import Delivery, DeliveryOutcome, PermanentFailure, TemporaryFailure

__all__ = ["DEFAULT_TEMPLATE", "PLACEHOLDERS", "FileDropDestination", "check_template", "safe_basename"]

DEFAULT_TEMPLATE = "{message_id}-{delivery_id}.hl7"
# {filename}: a routed document's own file name (its delivery id when it has none).
PLACEHOLDERS = frozenset({"message_id", "delivery_id", "channel", "destination", "control_id", "filename"})
MAX_NAME = 200  # bytes-ish, well under the usual 255-byte limit, leaving room for "-N" and temp names
MAX_SUFFIX = 1000

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

log = structlog.get_logger("relais.out.file")


def check_template(template: str, allowed: frozenset[str] = PLACEHOLDERS) -> str:
    """Raise ValueError unless `template` uses only `{name}` placeholders from `allowed`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"malformed template ({e})") from None
    for _literal, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in allowed or spec or conversion:
            raise ValueError(
                f"unknown placeholder {{{field_name}}}: expected plain ones among "
                + ", ".join(f"{{{p}}}" for p in sorted(allowed))
            )
    return template


def safe_basename(name: str) -> str:
    """A file name that stays in its folder: no separators, no leading dot, no '..', bounded length."""
    name = _UNSAFE.sub("_", name).lstrip(".")
    if not name:
        name = "message"
    if len(name) > MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        keep_ext = bool(dot) and 0 < len(ext) <= 16
        name = stem[: MAX_NAME - len(ext) - 1] + "." + ext if keep_ext else name[:MAX_NAME]
    return name


class FileDropDestination:
    """Drop each delivery into `folder` as `filename_template` (placeholders: message_id,
    delivery_id, channel, destination, control_id, filename).

    A file of the same name with the same content is a redelivery and is left as is; a
    different file of the same name is never overwritten: the new one gets `-2`, `-3`...
    before its extension. Any OSError is a TemporaryFailure.
    """

    def __init__(self, name: str, folder: Path, *, filename_template: str = DEFAULT_TEMPLATE) -> None:
        self.name = name
        self.folder = Path(folder)
        self.filename_template = check_template(filename_template)
        self._rename_lock = threading.Lock()
        self._folder_ready = False

    def filename_for(self, delivery: Delivery) -> str:
        values = {
            "message_id": delivery.message_id,
            "delivery_id": delivery.delivery_id,
            "channel": delivery.channel,
            "destination": delivery.destination,
            "control_id": str(delivery.metadata.get("control_id", "")),
            "filename": str(delivery.metadata.get("filename") or delivery.delivery_id),
        }
        return safe_basename(self.filename_template.format_map(values))

    async def deliver(self, delivery: Delivery) -> DeliveryOutcome:
        try:
            filename = self.filename_for(delivery)
        except (KeyError, ValueError) as e:  # cannot happen with a checked template; be explicit anyway
            raise PermanentFailure(f"cannot build the file name ({type(e).__name__})") from None
        try:
            written, fresh = await asyncio.to_thread(self._write, filename, delivery.payload)
        except OSError as e:
            log.warning("file_delivery_failed", destination=self.name, delivery_id=delivery.delivery_id,
                        attempt=delivery.attempt, error=type(e).__name__, errno=e.errno)  # fmt: skip
            # Not the file's name: `{filename}` is a document's own, which can name the patient,
            # and this reason is logged (the delivery id says which file it was).
            raise TemporaryFailure(f"cannot write the file ({type(e).__name__}, errno {e.errno})") from None
        detail = f"written {written}" if fresh else f"already present {written}"  # in the event only
        log.debug("file_delivered", destination=self.name, delivery_id=delivery.delivery_id,
                  attempt=delivery.attempt, fresh=fresh)  # fmt: skip
        return DeliveryOutcome(detail=detail)

    async def close(self) -> None:
        return None

    # -- blocking part, on a worker thread ---------------------------------------------------

    def _write(self, filename: str, payload: bytes) -> tuple[str, bool]:
        """Write `payload` as `filename` (or a suffixed name); return (name used, newly written)."""
        folder = self.folder
        if not self._folder_ready:
            folder.mkdir(parents=True, exist_ok=True)
            self._folder_ready = True
        tmp = folder / f".{filename}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._rename_lock:
                target, existing = self._free_name(folder, filename, payload)
                if existing:
                    tmp.unlink()
                    return target.name, False
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        return target.name, True

    @staticmethod
    def _free_name(folder: Path, filename: str, payload: bytes) -> tuple[Path, bool]:
        """The first of name, name-2, name-3... that is free or already holds `payload`."""
        stem, dot, ext = filename.rpartition(".")
        if not dot or not stem:
            stem, ext = filename, ""
        for n in range(1, MAX_SUFFIX + 1):
            name = filename if n == 1 else f"{stem}-{n}.{ext}" if ext else f"{stem}-{n}"
            candidate = folder / name
            try:
                if candidate.stat().st_size == len(payload) and candidate.read_bytes() == payload:
                    return candidate, True
            except FileNotFoundError:
                return candidate, False
        raise FileExistsError(f"{MAX_SUFFIX} files named like {filename} already exist")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
