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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import uvicorn
from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from connectors.http_body import BodyError, media_type, multipart_parts, read_body
from connectors.http_problems import (
    Accepted,
    MessageView,
    ProblemError,
    problem_response,
    problem_responses,
)
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
            raise ProblemError(
                401,
                "bearer token required",
                [FieldError("Authorization", "missing bearer token")],
                {"WWW-Authenticate": 'Bearer realm="relais"'},
            )
        client = clients.get(token_digest(token.strip()))
        if client is None:
            raise ProblemError(
                401,
                "unknown bearer token",
                [FieldError("Authorization", "token not recognised")],
                {"WWW-Authenticate": 'Bearer realm="relais", error="invalid_token"'},
            )
        return client

    def peer_of(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    @app.exception_handler(ProblemError)
    async def _on_problem(request: Request, exc: ProblemError) -> Response:
        return problem_response(exc.status, exc.title, exc.errors, exc.headers, exc.message_id)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            FieldError(".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), e["msg"]) for e in exc.errors()
        ]
        return problem_response(422, "request does not match the schema", errors[:20])

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return problem_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def record_refusal(
        request: Request, client: Client, key: str, body: bytes, problem: InvalidSubmission
    ) -> str | None:
        """Keep a refused request with the bytes that came; its message ID, None if not stored."""
        submission = rejected_submission(
            body,
            request.headers.get("content-type", ""),
            problem,
            listener=listener.name,
            peer=peer_of(request),
            client=client.name,
            idempotency_key=key,
        )
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

    async def refusal(
        request: Request, client: Client, key: str, body: bytes, problem: InvalidSubmission
    ) -> ProblemError:
        """The answer to a refused request, once it is recorded: its problem with the message ID
        to quote, or 503 when it could not be recorded (nothing may be refused unrecorded)."""
        message_id = await record_refusal(request, client, key, body, problem)
        if message_id is None:
            return ProblemError(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
        return ProblemError(problem.status, problem.title, problem.errors, message_id=message_id)

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
            **problem_responses(400, 401, 403, 408, 413, 415, 422, 503),
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
            raise ProblemError(403, "this client may not submit", [FieldError("Authorization", "role")])
        key = idempotency_key or ""
        media = media_type(request)
        if media not in ("application/json", "multipart/form-data"):
            raise ProblemError(
                415,
                "send application/json or multipart/form-data",
                [FieldError("Content-Type", f"{media or 'none'} is not accepted")],
            )
        body = await _body_or_problem(request, client, key)
        try:
            if media == "multipart/form-data":
                try:
                    meta, parts = await multipart_parts(request, body, listener.max_body_bytes)
                except ProblemError as p:
                    raise InvalidSubmission(p.status, p.title, p.errors) from None
                parsed, contents = parse_submission(meta, parts)
            else:
                parsed, contents = parse_submission(body)
        except InvalidSubmission as problem:
            raise await refusal(request, client, key, body, problem) from None
        if not client.may(parsed.kind):
            raise ProblemError(
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
            return problem_response(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
        if receipt.verdict.status != "accepted":  # the key was used before for another submission
            log.warning("idempotency_key_reused", message_id=str(receipt.message_id), listener=listener.name,
                        client=client.name)  # fmt: skip
            reused = [FieldError(receipt.verdict.location, "reused with a different body")]
            return problem_response(422, receipt.verdict.reason, reused, message_id=str(receipt.message_id))
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
            return await read_body(request, listener.max_body_bytes, listener.body_timeout)
        except BodyError as e:
            problem = InvalidSubmission(e.status, e.reason, [FieldError("body", e.reason)])
            raise await refusal(request, client, key, e.partial, problem) from None

    @app.post(
        "/v1/hl7",
        responses={
            200: {
                "description": "the HL7 ACK (AA/AE/AR, or CA/CE/CR in enhanced mode)",
                "content": {"application/hl7-v2": {"schema": {"type": "string"}}},
            },
            204: {"description": "no ACK is due (enhanced mode NE/ER/SU, or an ACK was sent)"},
            **problem_responses(400, 401, 403, 408, 413, 415, 503),
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
            raise ProblemError(403, "this client may not send HL7", [FieldError("Authorization", "role")])
        media = media_type(request)
        if media not in HL7_TYPES:
            raise ProblemError(
                415, f"send ER7 as {HL7_TYPES[0]}", [FieldError("Content-Type", f"{media or 'none'} is not accepted")]
            )
        submitter = _ClientSubmitter(ingestor, client)
        intake = Hl7Intake(hl7_rules, submitter, protocol="http-hl7", decisions=decisions)
        peer = peer_of(request)
        try:
            raw = await read_body(request, listener.max_body_bytes, listener.body_timeout)
        except BodyError as e:
            # Recorded first, as every refusal is; the problem quotes the record's ID.
            receipt = await intake.refused_body(e.partial, peer, e.reason)
            if receipt is None:
                return problem_response(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
            raise ProblemError(
                e.status, e.reason, [FieldError("body", e.reason)], message_id=str(receipt.message_id)
            ) from None
        answer = await intake.handle(raw, peer)
        if submitter.unavailable:
            if isinstance(answer, FrameAnswer):
                _discard(answer.later)
            return problem_response(503, "not stored; resend later", headers={"Retry-After": RETRY_AFTER})
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
        responses=problem_responses(401, 404, 422),
        summary="Status and events of any message, whatever its protocol",
    )
    async def message(request: Request, message_id: uuid.UUID) -> Response:
        client = authenticate(request)
        not_found = ProblemError(404, "no such message", [FieldError("message_id", "unknown")])
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
