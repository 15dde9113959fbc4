"""Reading an HTTP request body for the REST API: bounded in size and time, multipart parts.

What did arrive of a refused body travels with the error (`BodyError.partial`): refusals are
recorded with the bytes that came.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import ClientDisconnect, Request

from connectors.http_problems import ProblemError
from engine.rest_intake import FieldError

__all__ = ["BodyError", "media_type", "multipart_parts", "read_body"]


class BodyError(Exception):
    def __init__(self, status: int, reason: str, partial: bytes) -> None:
        super().__init__(reason)
        self.status, self.reason, self.partial = status, reason, partial


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, within `timeout` seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyError(413, f"body larger than {limit} bytes", b"")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"body larger than {limit} bytes", b"".join(chunks))
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(408, f"body not received within {timeout:g} s", b"".join(chunks)) from None
    except ClientDisconnect:
        raise BodyError(400, "client closed the connection before the end of the body", b"".join(chunks)) from None
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def multipart_parts(request: Request, body: bytes, limit: int) -> tuple[bytes, dict[str, bytes]]:
    """The `metadata` JSON part and the file parts by name, from an already read body."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> Any:
        yield body
        yield b""

    try:
        parser = MultiPartParser(request.headers, stream(), max_files=100, max_fields=100, max_part_size=limit)
        form = await parser.parse()
    except MultiPartException as e:
        raise ProblemError(400, "multipart body cannot be read", [FieldError("body", str(e)[:200])]) from None
    metadata = form.get("metadata")
    if metadata is None:
        raise ProblemError(422, "multipart body has no 'metadata' part", [FieldError("metadata", "missing")])
    meta_bytes = await metadata.read() if isinstance(metadata, UploadFile) else metadata.encode()
    parts: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if key != "metadata":
            parts[key] = await value.read() if isinstance(value, UploadFile) else value.encode()
    await form.close()
    return meta_bytes, parts
