"""What goes over the Unix sockets between Relais's processes (acceptors, router process,
writer process): length-prefixed pickles of plain tuples. Unpickling dataclasses runs
Python code for each one; plain tuples and bytes do not.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
import uuid
from typing import Any

import orjson
import structlog

from engine.ingest import Appendix, IngestUnavailable, Receipt, Submission, Verdict
from event_store import PayloadRef
from event_store.events import EncodedEvent, topic_of

__all__ = [
    "ALIVE_EVERY",
    "HANG_TIMEOUT",
    "blob_synced",
    "frame",
    "kill_if_hung",
    "pack_appendix",
    "pack_receipt",
    "pack_submission",
    "read_frame",
    "send",
    "send_alive",
    "unpack_appendix",
    "unpack_receipt",
    "unpack_submission",
]

log = structlog.get_logger("relais.wire")

_HEADER = struct.Struct("!I")


async def read_frame(reader: asyncio.StreamReader) -> Any:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send(writer: asyncio.StreamWriter, obj: Any) -> None:
    """Write `obj` as one frame. On a connection already closed (the other process gone) the
    frame is dropped, as asyncio's transports do; uvloop's raise RuntimeError instead. Who
    waits for an answer then waits until stopped, and the supervisor sees the death."""
    if not writer.is_closing():
        writer.write(frame(obj))


# A child process (router, writer) says it is alive this often, from its event loop; its
# parent takes a silence of HANG_TIMEOUT for a hang (a loop stuck, SIGSTOP) and kills it,
# which its supervisor then sees as a death: restarted, waiting callers answered.
ALIVE_EVERY = 1.0
HANG_TIMEOUT = 60.0


async def send_alive(writer: asyncio.StreamWriter) -> None:
    """In a child process: an ("alive", 0, None) frame every ALIVE_EVERY seconds."""
    while not writer.is_closing():
        send(writer, ("alive", 0, None))
        await asyncio.sleep(ALIVE_EVERY)


def kill_if_hung(proc: Any, alive_at: float, timeout: float, name: str) -> None:
    """In the parent: kill a child process that is alive but has sent nothing for `timeout`
    seconds since `alive_at` (loop time). Its supervisor then restarts it as one that died."""
    silent = asyncio.get_running_loop().time() - alive_at
    if silent > timeout:
        log.error(f"{name}_hung", pid=proc.pid, silent_s=round(silent, 1))
        proc.kill()


def _ref(ref: PayloadRef | None) -> tuple[Any, ...] | None:
    return (ref.sha256, ref.size, ref.content_type, ref.inline) if ref is not None else None


def _verdict(v: Verdict | None) -> tuple[str, ...] | None:
    return (v.status, v.ack_code, v.error_code, v.reason, v.location) if v is not None else None


async def blob_synced(submission: Submission) -> None:
    """Before a submission leaves for another process's writer: that commit cannot wait for
    a sync under way in this process, so the submission waits for its blob to be durable."""
    if submission.blob_synced is not None:
        try:
            await asyncio.wrap_future(submission.blob_synced)
        except OSError as e:
            raise IngestUnavailable(f"blob not stored: {type(e).__name__}") from e
        submission.blob_synced = None


def pack_submission(sub: Submission) -> tuple[Any, ...]:
    """A submission whose blob, if any, is already synced (`blob_synced` is not sent)."""
    return (
        sub.listener, sub.protocol, sub.peer, sub.payload, sub.content_type, sub.sender, sub.control_id,
        sub.message_type, sub.trigger_event, sub.metadata, _verdict(sub.verdict),
        # The protocol's own events (InstanceReceived...) and a blob the edge stored.
        sub.events or None, _ref(sub.stored_payload),
        [(_ref(ref), data) for ref, data in sub.payloads] or None, _verdict(sub.reused_key_verdict),
    )  # fmt: skip


def unpack_submission(t: tuple[Any, ...]) -> Submission:
    return Submission(
        listener=t[0], protocol=t[1], peer=t[2], payload=t[3], content_type=t[4], sender=t[5],
        control_id=t[6], message_type=t[7], trigger_event=t[8], metadata=t[9], verdict=Verdict(*t[10]),
        events=t[11] or [], stored_payload=PayloadRef(*t[12]) if t[12] is not None else None,
        payloads=[(PayloadRef(*ref), data) for ref, data in t[13] or ()],
        reused_key_verdict=Verdict(*t[14]) if t[14] is not None else None,
    )  # fmt: skip


def pack_receipt(r: Receipt) -> tuple[Any, ...]:
    return (r.message_id.bytes, r.received_at, _verdict(r.verdict), r.duplicate, r.flags)


def unpack_receipt(t: tuple[Any, ...]) -> Receipt:
    return Receipt(uuid.UUID(bytes=t[0]), t[1], Verdict(*t[2]), t[3], t[4])


def pack_appendix(a: Appendix) -> tuple[Any, ...]:
    """The events encoded here, once, by the process that derived them."""
    events = [
        (oid.bytes, topic_of(e), e.body if isinstance(e, EncodedEvent) else orjson.dumps(e)) for oid, e in a.events
    ]
    payloads = [(*_ref(ref), data) for ref, data in a.payloads]  # type: ignore[misc]
    return (events, payloads, a.statements)


def unpack_appendix(t: tuple[Any, ...]) -> Appendix:
    return Appendix(
        events=[(uuid.UUID(bytes=oid), EncodedEvent(topic, body)) for oid, topic, body in t[0]],
        payloads=[
            (PayloadRef(sha256, size, content_type, inline), data) for sha256, size, content_type, inline, data in t[1]
        ],
        statements=t[2],
    )
