"""The REST API: submissions, HL7 v2 over HTTP and message status, on uvicorn in Relais's
own event loop. Answers only after the group commit; every error is problem+json.

>>> server = RestServer(listener, ingestor, store); await server.start(); ...; await server.stop()
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import uvicorn
from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from connectors.mllp import FrameAnswer
from engine.config import HttpListener, HttpToken, MllpListener
from engine.hl7_intake import Hl7Intake
from engine.ingest import IngestUnavailable, Receipt, Submission, Submitter
from engine.rest_intake import (
    FieldError,
    InvalidSubmission,
    SubmissionBody,
    build_submission,
    parse_submission,
    rejected_submission,
)
from engine.tasks import in_thread
from event_store import EventStore

__all__ = ["Client", "RestServer", "create_app", "token_digest"]

log = structlog.get_logger("relais.rest")

PROBLEM = "application/problem+json"
HL7_TYPES = ("application/hl7-v2", "x-application/hl7-v2+er7", "text/plain")
RETRY_AFTER = "5"
# Who may do what; every client may read its own messages.
SUBMIT_ROLES = {
    "document": frozenset({"sender", "integrator", "admin"}),
    "telemedicine": frozenset({"sender", "professional", "integrator", "admin"}),
    "hl7": frozenset({"sender", "integrator", "admin"}),
}
READ_ALL_ROLES = frozenset({"integrator", "auditor", "admin"})


def token_digest(token: str) -> str:
    """What config.toml stores for a token: its hex SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    sender: str
    roles: frozenset[str]

    def may(self, action: str) -> bool:
        return bool(self.roles & SUBMIT_ROLES[action])

    @property
    def reads_all(self) -> bool:
        return bool(self.roles & READ_ALL_ROLES)


class _Problem(Exception):
    def __init__(
        self, status: int, title: str, errors: Iterable[FieldError] = (), headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(title)
        self.status, self.title, self.errors, self.headers = status, title, list(errors), headers or {}


# -- documented shapes (OpenAPI) --------------------------------------------------------------


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


def _problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
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


def _problem(
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


# -- reading requests ------------------------------------------------------------------------------


class _BodyError(Exception):
    def __init__(self, status: int, reason: str, partial: bytes) -> None:
        super().__init__(reason)
        self.status, self.reason, self.partial = status, reason, partial


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, within `timeout` seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyError(413, f"body larger than {limit} bytes", b"")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyError(413, f"body larger than {limit} bytes", b"".join(chunks))
                chunks.append(chunk)
    except TimeoutError:
        raise _BodyError(408, f"body not received within {timeout:g} s", b"".join(chunks)) from None
    except ClientDisconnect:
        raise _BodyError(400, "client closed the connection before the end of the body", b"".join(chunks)) from None
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _multipart_parts(request: Request, body: bytes, limit: int) -> tuple[bytes, dict[str, bytes]]:
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
        raise _Problem(400, "multipart body cannot be read", [FieldError("body", str(e)[:200])]) from None
    metadata = form.get("metadata")
    if metadata is None:
        raise _Problem(422, "multipart body has no 'metadata' part", [FieldError("metadata", "missing")])
    meta_bytes = await metadata.read() if isinstance(metadata, UploadFile) else metadata.encode()
    parts: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if key != "metadata":
            parts[key] = await value.read() if isinstance(value, UploadFile) else value.encode()
    await form.close()
    return meta_bytes, parts


class _ClientSubmitter:
    """The ingestor, seen through one HTTP client: marks its messages as the client's and
    notes when the store could not commit (HTTP answers that with 503, not an ACK)."""

    def __init__(self, ingestor: Submitter, client: Client) -> None:
        self.ingestor, self.client, self.unavailable = ingestor, client, False

    async def submit(self, submission: Submission) -> Receipt:
        submission.metadata["client"] = self.client.name
        try:
            return await self.ingestor.submit(submission)
        except IngestUnavailable:
            self.unavailable = True
            raise


# -- the app ------------------------------------------------------------------------------------


def _status_of(topics: list[str], events: list[dict[str, Any]]) -> str:
    if "relais.MessageRejected" in topics:
        return "rejected"
    if "relais.DeadLettered" in topics:
        return "dead_lettered"
    if "relais.NotRouted" in topics:
        return "not_routed"
    planned = {d["delivery_id"] for e in events for d in e.get("deliveries", ())}
    delivered = {e["delivery_id"] for t, e in zip(topics, events, strict=True) if t == "relais.Delivered"}
    if planned and planned <= delivered:
        return "delivered"
    if "relais.MessageRouted" in topics:
        return "routed"
    return "accepted"


def create_app(
    listener: HttpListener,
    ingestor: Submitter,
    store: EventStore,
    decisions: Callable[[uuid.UUID], Awaitable[Any]] | None = None,
) -> FastAPI:
    """The FastAPI application of one HTTP listener."""
    clients = {t.sha256: _client(t) for t in listener.tokens}
    hl7_rules = MllpListener(
        name=listener.name, max_frame_bytes=listener.max_body_bytes, default_charset=listener.default_charset
    )
    app = FastAPI(
        title="Relais REST API",
        version="1",
        description="Submissions (documents, telemedicine requests), HL7 v2 over HTTP and message status. "
        "Answers 202 only once the submission is durable.",
        docs_url=None,
        redoc_url=None,
    )

    def authenticate(request: Request) -> Client:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Problem(
                401,
                "bearer token required",
                [FieldError("Authorization", "missing bearer token")],
                {"WWW-Authenticate": 'Bearer realm="relais"'},
            )
        client = clients.get(token_digest(token.strip()))
        if client is None:
            raise _Problem(
                401,
                "unknown bearer token",
                [FieldError("Authorization", "token not recognised")],
                {"WWW-Authenticate": 'Bearer realm="relais", error="invalid_token"'},
            )
        return client

    def peer_of(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    @app.exception_handler(_Problem)
    async def _on_problem(request: Request, exc: _Problem) -> Response:
        return _problem(exc.status, exc.title, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            FieldError(".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), e["msg"]) for e in exc.errors()
        ]
        return _problem(422, "request does not match the schema", errors[:20])

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return _problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def record_refusal(submission: Submission) -> str | None:
        try:
            receipt = await ingestor.submit(submission)
        except IngestUnavailable:
            log.error("refused_request_not_stored", listener=listener.name, peer=submission.peer)
            return None
        log.warning(
            "request_refused",
            message_id=str(receipt.message_id),
            listener=listener.name,
            reason=submission.verdict.reason[:120],
        )
        return str(receipt.message_id)

    async def refuse(request: Request, client: Client, key: str, body: bytes, problem: InvalidSubmission) -> Response:
        rejected = rejected_submission(
            body,
            request.headers.get("content-type", ""),
            problem,
            listener=listener.name,
            peer=peer_of(request),
            client=client.name,
            idempotency_key=key,
        )
        message_id = await record_refusal(rejected)
        if message_id is None:
            return _problem(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
        return _problem(problem.status, problem.title, problem.errors, message_id=message_id)

    submission_schema = TypeAdapter(SubmissionBody).json_schema(ref_template="#/components/schemas/{model}")
    defs = submission_schema.pop("$defs", {})
    # In a JSON body a document carries its bytes in `content`; `part` is for multipart.
    defs["DocumentIn"]["properties"].pop("part")
    defs["DocumentIn"]["required"].append("content")

    @app.post(
        "/v1/submissions",
        status_code=202,
        response_model=Accepted,
        responses={
            202: {"headers": {"Location": {"schema": {"type": "string"}}}},
            **_problem_responses(400, 401, 403, 408, 413, 415, 422, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": submission_schema},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["metadata"],
                            "properties": {"metadata": submission_schema},
                            "additionalProperties": {"type": "string", "format": "binary"},
                        },
                        "encoding": {"metadata": {"contentType": "application/json"}},
                    },
                },
            }
        },
        summary="Submit documents or a telemedicine request",
        description="Documents are base64 in `content` or multipart parts named by `part`. With "
        "`Idempotency-Key`, a resend of the same submission answers the original 202 again "
        "(same id, `duplicate: true`); the same key with another submission is refused (422).",
    )
    async def submit(
        request: Request,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", min_length=1, max_length=200),
    ) -> Response:
        client = authenticate(request)
        if not (client.may("document") or client.may("telemedicine")):
            raise _Problem(403, "this client may not submit", [FieldError("Authorization", "role")])
        key = idempotency_key or ""
        media = _media_type(request)
        if media not in ("application/json", "multipart/form-data"):
            raise _Problem(
                415,
                "send application/json or multipart/form-data",
                [FieldError("Content-Type", f"{media or 'none'} is not accepted")],
            )
        body = await _body_or_problem(request, client, key)
        try:
            if media == "multipart/form-data":
                try:
                    meta, parts = await _multipart_parts(request, body, listener.max_body_bytes)
                except _Problem as p:
                    raise InvalidSubmission(p.status, p.title, p.errors) from None
                parsed, contents = parse_submission(meta, parts)
            else:
                parsed, contents = parse_submission(body)
        except InvalidSubmission as problem:
            return await refuse(request, client, key, body, problem)
        if not client.may(parsed.kind):
            raise _Problem(
                403,
                f"this client may not submit {parsed.kind} requests",
                [FieldError("kind", f"roles {sorted(client.roles)} do not allow it")],
            )
        submission = build_submission(
            parsed,
            contents,
            listener=listener.name,
            peer=peer_of(request),
            client=client.name,
            sender=client.sender,
            idempotency_key=key,
            inline_limit=store.inline_limit,
        )
        try:
            receipt = await ingestor.submit(submission)
        except IngestUnavailable:
            log.error("submission_not_stored", listener=listener.name, client=client.name)
            return _problem(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
        if receipt.verdict.status != "accepted":  # the key was used before for another submission
            log.warning("idempotency_key_reused", message_id=str(receipt.message_id), listener=listener.name,
                        client=client.name)  # fmt: skip
            reused = [FieldError(receipt.verdict.location, "reused with a different body")]
            return _problem(422, receipt.verdict.reason, reused, message_id=str(receipt.message_id))
        log.info(
            "submission_received",
            message_id=str(receipt.message_id),
            listener=listener.name,
            client=client.name,
            kind=parsed.kind,
            documents=len(contents),
            duplicate=receipt.duplicate,
        )
        answer = {
            "id": str(receipt.message_id),
            "status": receipt.verdict.status,
            "received_at": receipt.received_at,
            "duplicate": receipt.duplicate,
        }
        headers = {"Location": f"/v1/messages/{receipt.message_id}"}
        if receipt.duplicate:
            headers["Idempotent-Replayed"] = "true"
        return Response(orjson.dumps(answer), status_code=202, media_type="application/json", headers=headers)

    async def _body_or_problem(request: Request, client: Client, key: str) -> bytes:
        try:
            return await _read_body(request, listener.max_body_bytes, listener.body_timeout)
        except _BodyError as e:
            problem = InvalidSubmission(e.status, e.reason, [FieldError("body", e.reason)])
            rejected = rejected_submission(
                e.partial,
                request.headers.get("content-type", ""),
                problem,
                listener=listener.name,
                peer=peer_of(request),
                client=client.name,
                idempotency_key=key,
            )
            await record_refusal(rejected)
            raise _Problem(e.status, e.reason, [FieldError("body", e.reason)]) from None

    @app.post(
        "/v1/hl7",
        responses={
            200: {
                "description": "the HL7 ACK (AA/AE/AR, or CA/CE/CR in enhanced mode)",
                "content": {"application/hl7-v2": {"schema": {"type": "string"}}},
            },
            204: {"description": "no ACK is due (enhanced mode NE/ER/SU, or an ACK was sent)"},
            **_problem_responses(400, 401, 403, 408, 413, 415, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {t: {"schema": {"type": "string"}} for t in HL7_TYPES},
            }
        },
        response_class=Response,
        summary="HL7 v2 over HTTP (body = ER7), with the MLLP acknowledgement semantics",
    )
    async def hl7(request: Request) -> Response:
        client = authenticate(request)
        if not client.may("hl7"):
            raise _Problem(403, "this client may not send HL7", [FieldError("Authorization", "role")])
        media = _media_type(request)
        if media not in HL7_TYPES:
            raise _Problem(
                415, f"send ER7 as {HL7_TYPES[0]}", [FieldError("Content-Type", f"{media or 'none'} is not accepted")]
            )
        submitter = _ClientSubmitter(ingestor, client)
        intake = Hl7Intake(hl7_rules, submitter, protocol="http-hl7", decisions=decisions)
        peer = peer_of(request)
        try:
            raw = await _read_body(request, listener.max_body_bytes, listener.body_timeout)
        except _BodyError as e:
            if e.status == 413:
                await intake.oversized(e.partial, peer)
            else:
                await intake.truncated(e.partial, peer, e.reason)
            raise _Problem(e.status, e.reason, [FieldError("body", e.reason)]) from None
        answer = await intake.handle(raw, peer)
        if submitter.unavailable:
            if isinstance(answer, FrameAnswer):
                _discard(answer.later)
            return _problem(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
        if isinstance(answer, FrameAnswer):
            # HTTP has one answer per request: the commit ACK; the application ACK is not sent.
            _discard(answer.later)
            answer = answer.now
        if answer is None:
            return Response(status_code=204)
        return Response(answer, status_code=200, media_type="application/hl7-v2")

    @app.get(
        "/v1/messages/{message_id}",
        response_model=MessageView,
        responses=_problem_responses(401, 404, 422),
        summary="Status and events of any message, whatever its protocol",
    )
    async def message(request: Request, message_id: uuid.UUID) -> Response:
        client = authenticate(request)
        not_found = _Problem(404, "no such message", [FieldError("message_id", "unknown")])
        oid = message_id
        records = await in_thread(store.events_of, oid)
        if not records or records[0].topic != "relais.MessageReceived":
            raise not_found
        first = records[0].event
        if not client.reads_all and first.get("metadata", {}).get("client") != client.name:
            raise not_found  # not 403: ids of other clients' messages do not leak
        topics = [r.topic for r in records]
        view = {
            "id": str(oid),
            "protocol": first["protocol"],
            "listener": first["listener"],
            "received_at": first["recorded_at"],
            "status": _status_of(topics, [r.event for r in records]),
            "events": [
                {
                    "version": r.version,
                    "topic": r.topic,
                    "recorded_at": r.event.get("recorded_at", ""),
                    "fields": {k: v for k, v in r.event.items() if k != "recorded_at"},
                }
                for r in records
            ],
        }
        return Response(orjson.dumps(view), media_type="application/json")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _discard(later: Awaitable[Any] | None) -> None:
    if later is not None and hasattr(later, "close"):
        later.close()


def _client(token: HttpToken) -> Client:
    return Client(token.name, token.sender or token.name, frozenset(token.roles))


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket whose protocol is IPPROTO_TCP explicitly: asyncio sets
    TCP_NODELAY only on such sockets, and without it every answer waits ~40 ms for the
    client's delayed ACK (headers and body go out as two writes)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class RestServer:
    """One HTTP listener: uvicorn serving the app on Relais's loop (no signals of its own)."""

    def __init__(
        self,
        listener: HttpListener,
        ingestor: Submitter,
        store: EventStore,
        decisions: Callable[[uuid.UUID], Awaitable[Any]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = listener.name
        self.listener = listener
        self.app = create_app(listener, ingestor, store, decisions)
        self.ssl_context = ssl_context
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticks: asyncio.Task[None] | None = None
        self.bound_port = 0

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.listener.host,
            port=self.listener.port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        config.load()
        config.ssl = self.ssl_context  # ours: TLS 1.2+ and client certificates as configured
        self._socket = _listening_socket(self.listener.host, self.listener.port)
        self.bound_port = self._socket.getsockname()[1]
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self._ticks = asyncio.create_task(server.main_loop(), name=f"relais-http-{self.name}")
        log.info("http_listening", listener=self.name, port=self.bound_port, tls=self.ssl_context is not None)

    async def stop(self) -> None:
        if self._server is None:
            if self._socket is not None:
                self._socket.close()
            return
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = None
