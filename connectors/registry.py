"""Outbound destination kinds: one pydantic settings model and one builder per protocol.
A route loader validates settings at start-up with `validate_settings`, the engine builds with
`build_destination`; new kinds (DICOM, SMTP) are one more entry in `KINDS`."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from connectors.destination import Destination
from connectors.file import DEFAULT_TEMPLATE, FileDropDestination, check_template
from connectors.http import HttpDestination
from connectors.mllp_out import MllpDestination
from connectors.mqtt import DEFAULT_TOPIC, MqttDestination, check_topic_template

__all__ = [
    "KINDS",
    "DestinationKind",
    "FileSettings",
    "HttpSettings",
    "MllpSettings",
    "MqttSettings",
    "build_destination",
    "client_ssl_context",
    "validate_settings",
]

Port = Field(ge=1, le=65535)
RESERVED_HEADERS = frozenset({"content-type", "idempotency-key", "x-relais-message-id", "content-length", "host"})


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TlsFiles(_Settings):
    """TLS towards the partner: the system CAs unless `tls_ca`; a client certificate for mutual TLS."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _existing_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        path = _resolve(value, info)
        if path is not None and not path.is_file():
            raise ValueError(f"expected an existing PEM file, {path} is not one")
        return path

    @model_validator(mode="after")
    def _cert_with_key(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (client certificate and its key)")
        return self


class _TlsSettings(_TlsFiles):
    """For socket protocols (MLLP, MQTT): TLS only when `tls = true`."""

    tls: bool = False

    @model_validator(mode="after")
    def _tls_on(self) -> Self:
        if not self.tls and (self.tls_ca or self.tls_cert):
            raise ValueError("tls_ca/tls_cert/tls_key are set but tls is not true")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return client_ssl_context(self.tls_ca, self.tls_cert, self.tls_key)


def _secret(value: SecretStr | None, env: str | None, key: str) -> str | None:
    if env:
        secret = os.environ.get(env)
        if secret is None:
            raise ValueError(f"{key}_env: environment variable {env} is not set")
        return secret
    return value.get_secret_value() if value is not None else None


class MllpSettings(_TlsSettings):
    host: str = Field(min_length=1)
    port: int = Port
    ack_timeout: float = Field(default=10.0, gt=0, le=3600)
    connect_timeout: float = Field(default=5.0, gt=0, le=3600)
    server_hostname: str | None = None  # TLS name to check, when it differs from host
    max_ack_bytes: int = Field(default=1024 * 1024, ge=1024)
    connections: int = Field(default=1, ge=1, le=64, description="parallel connections, one message in flight on each")


class HttpSettings(_TlsFiles):
    """TLS follows the URL scheme (https://); tls_ca/tls_cert/tls_key refine it."""

    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token: SecretStr | None = None
    bearer_token_env: str | None = None  # read the token from this environment variable instead
    timeout: float = Field(default=10.0, gt=0, le=3600)
    verify: bool = True  # false: accept any server certificate (test setups only)
    body: Literal["raw", "json"] = "raw"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value:
            if header.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {header} is set by Relais and cannot be configured")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if self.bearer_token is not None and self.bearer_token_env:
            raise ValueError("bearer_token and bearer_token_env: give one of them, not both")
        if (self.tls_ca or self.tls_cert) and not self.url.startswith("https://"):
            raise ValueError("tls_ca/tls_cert/tls_key are set but url is not https://")
        return self


class FileSettings(_Settings):
    folder: Path
    filename_template: str = DEFAULT_TEMPLATE

    @field_validator("folder")
    @classmethod
    def _resolve_folder(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        assert path is not None
        return path

    @field_validator("filename_template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)


class MqttSettings(_TlsSettings):
    host: str = Field(min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    topic: str = DEFAULT_TOPIC
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None  # read the password from this environment variable instead
    client_id: str | None = None
    timeout: float = Field(default=10.0, gt=0, le=3600)
    keepalive: int = Field(default=60, ge=5, le=65535)
    body: Literal["raw", "json"] = "raw"

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_topic_template(value)

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password is not None and self.password_env:
            raise ValueError("password and password_env: give one of them, not both")
        return self


S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class DestinationKind(Generic[S]):
    settings: type[S]
    build: Callable[[str, S], Destination]


def _build_mllp(name: str, s: MllpSettings) -> Destination:
    return MllpDestination(name, s.host, s.port, ack_timeout=s.ack_timeout, connect_timeout=s.connect_timeout,
                           ssl_context=s.ssl_context(), server_hostname=s.server_hostname,
                           max_ack_bytes=s.max_ack_bytes, connections=s.connections)  # fmt: skip


def _build_http(name: str, s: HttpSettings) -> Destination:
    verify: bool | ssl.SSLContext = False
    if s.verify or s.tls_cert:
        verify = client_ssl_context(s.tls_ca, s.tls_cert, s.tls_key)
        if not s.verify:  # a client certificate, but no check of the server's (test setups only)
            verify.check_hostname = False
            verify.verify_mode = ssl.CERT_NONE
    return HttpDestination(name, s.url, method=s.method, headers=s.headers,
                           bearer_token=_secret(s.bearer_token, s.bearer_token_env, "bearer_token"),
                           timeout=s.timeout, verify=verify, body=s.body)  # fmt: skip


def _build_file(name: str, s: FileSettings) -> Destination:
    return FileDropDestination(name, s.folder, filename_template=s.filename_template)


def _build_mqtt(name: str, s: MqttSettings) -> Destination:
    return MqttDestination(name, s.host, s.port, topic=s.topic, qos=s.qos, retain=s.retain,
                           username=s.username, password=_secret(s.password, s.password_env, "password"),
                           ssl_context=s.ssl_context(), client_id=s.client_id, timeout=s.timeout,
                           keepalive=s.keepalive, body=s.body)  # fmt: skip


class DicomStoreSettings(_TlsSettings):
    """A DICOM node that receives studies by C-STORE (we are the SCU)."""

    host: str = Field(min_length=1)
    port: int = Port
    called_ae: str = Field(min_length=1, max_length=16)
    calling_ae: str = Field(default="RELAIS", min_length=1, max_length=16)
    timeout: float = Field(default=30.0, gt=0, le=3600)
    max_pdu: int = Field(default=1024 * 1024, ge=16 * 1024)
    server_hostname: str | None = None
    # The receiver's patient-identifier domain: our PatientID -> theirs, and their issuer.
    patient_id_map: dict[str, str] = Field(default_factory=dict)
    issuer_of_patient_id: str | None = None
    unmapped_patient: Literal["keep", "fail"] = "keep"


def _build_dicom(name: str, s: DicomStoreSettings) -> Destination:
    from connectors.dicom_out import DicomDestination

    return DicomDestination(name, s.host, s.port, s.called_ae, calling_ae=s.calling_ae, timeout=s.timeout,
                            max_pdu=s.max_pdu, patient_id_map=s.patient_id_map,
                            issuer_of_patient_id=s.issuer_of_patient_id, unmapped_patient=s.unmapped_patient,
                            ssl_context=s.ssl_context(), server_hostname=s.server_hostname)  # fmt: skip


class SmtpSettings(_TlsFiles):
    """A mailbox on an SMTP relay (MSSanté): STARTTLS always, AUTH when `username` is set."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    mail_from: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[str] = Field(default_factory=list, description="empty: the To of a message/rfc822 payload (MDNs)")
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None  # read the password from this environment variable instead
    subject: str = "Document transmis par Relais"
    timeout: float = Field(default=30.0, gt=0, le=3600)
    verify: bool = True  # false: accept any server certificate (test setups only)
    helo: str | None = None

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password is not None and self.password_env:
            raise ValueError("password and password_env: give one of them, not both")
        return self


def _build_smtp(name: str, s: SmtpSettings) -> Destination:
    from connectors.smtp_out import SmtpDestination

    ctx = client_ssl_context(s.tls_ca, s.tls_cert, s.tls_key)
    if not s.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return SmtpDestination(name, s.host, s.port, mail_from=s.mail_from, to=s.to, username=s.username,
                           password=_secret(s.password, s.password_env, "password"), ssl_context=ctx,
                           timeout=s.timeout, subject=s.subject, helo=s.helo)  # fmt: skip


KINDS: dict[str, DestinationKind[Any]] = {
    "mllp": DestinationKind(MllpSettings, _build_mllp),
    "http": DestinationKind(HttpSettings, _build_http),
    "file": DestinationKind(FileSettings, _build_file),
    "mqtt": DestinationKind(MqttSettings, _build_mqtt),
    "dicom": DestinationKind(DicomStoreSettings, _build_dicom),
    "smtp": DestinationKind(SmtpSettings, _build_smtp),
}


def validate_settings(kind: str, settings: dict[str, Any], base_dir: Path, *, name: str = "") -> BaseModel:
    """The validated settings model of `kind`; ValueError naming the key and what was expected."""
    prefix = f"destination {name!r} ({kind})" if name else f"{kind} destination"
    entry = KINDS.get(kind)
    if entry is None:
        raise ValueError(f"{prefix}: kind: unknown destination kind, expected one of {', '.join(sorted(KINDS))}")
    try:
        return entry.settings.model_validate(settings, context={"base_dir": Path(base_dir)})
    except ValidationError as e:
        raise ValueError(f"{prefix}: " + "; ".join(_describe(err, entry.settings) for err in e.errors())) from None


def build_destination(name: str, kind: str, settings: dict[str, Any], base_dir: Path) -> Destination:
    """A ready destination (not connected yet: connections open on the first delivery)."""
    validated = validate_settings(kind, settings, base_dir, name=name)
    try:
        return KINDS[kind].build(name, validated)
    except ssl.SSLError as e:
        raise ValueError(f"destination {name!r} ({kind}): tls_cert/tls_key/tls_ca: cannot load ({e})") from None
    except ValueError as e:
        raise ValueError(f"destination {name!r} ({kind}): {e}") from None


def client_ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client context that checks the server (system CAs, or `ca`), with an optional client cert."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def _describe(err: Any, model: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "settings"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown setting, expected one of {', '.join(model.model_fields)}"
    if kind == "missing":
        return f"{key}: required setting is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}: {msg}"
