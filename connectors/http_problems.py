"""HTTP errors as RFC 9457 problem+json, and the shapes the REST API documents (OpenAPI).

Every error the REST API answers goes through `problem_response`; `ProblemError` raised in a
handler becomes one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import Response
from pydantic import BaseModel, Field

from engine.rest_intake import FieldError

__all__ = [
    "PROBLEM",
    "Accepted",
    "EventView",
    "MessageView",
    "Problem",
    "ProblemError",
    "ProblemField",
    "problem_response",
    "problem_responses",
]

PROBLEM = "application/problem+json"


class ProblemError(Exception):
    """Raised in a handler: answered as problem+json with `status`, `title` and the fields at fault."""

    def __init__(
        self,
        status: int,
        title: str,
        errors: Iterable[FieldError] = (),
        headers: dict[str, str] | None = None,
        message_id: str | None = None,  # the refused request, when it was recorded
    ) -> None:
        super().__init__(title)
        self.status, self.title, self.errors, self.headers = status, title, list(errors), headers or {}
        self.message_id = message_id


class ProblemField(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; `errors` names the fields at fault."""

    type: str
    title: str
    status: int
    detail: str = ""
    errors: list[ProblemField] = Field(default_factory=list)
    message_id: str | None = None


class Accepted(BaseModel):
    id: str = Field(description="the message ID; follow the Location header for its status")
    status: str
    received_at: str
    duplicate: bool = Field(description="true when this answers a resend under the same Idempotency-Key")


class EventView(BaseModel):
    version: int
    topic: str
    recorded_at: str
    fields: dict[str, Any]


class MessageView(BaseModel):
    id: str
    protocol: str
    listener: str
    received_at: str
    status: str = Field(description="accepted | rejected | routed | not_routed | delivered | dead_lettered")
    events: list[EventView]


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem, "content": {PROBLEM: {}}, "description": _TITLES[code]} for code in codes}


_TITLES = {
    400: "Malformed request",
    401: "Missing or unknown bearer token",
    403: "The client's roles do not allow this",
    404: "No such message (or not visible to this client)",
    408: "The request body did not arrive in time",
    413: "The request body is too large",
    415: "Unsupported content type",
    422: "The request does not match the schema",
    503: "Not stored: resend later (Retry-After)",
}


def problem_response(
    status: int,
    title: str,
    errors: Iterable[FieldError] = (),
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": _TITLES.get(status, ""),
        "errors": [{"field": e.field, "message": e.message} for e in errors],
    }
    if message_id:
        body["message_id"] = message_id
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=headers)
