"""`config.toml`, validated once at start-up into pydantic models.

Paths in the file are relative to the file itself. An error names the file, the key and
what was expected:  `config.toml: listeners.mllp[0].port: Input should be ... (got 'x')`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.toml_files import describe_validation_error, read_toml
from event_store import EventStore

__all__ = [
    "ConfigError",
    "DicomListener",
    "HttpListener",
    "HttpToken",
    "MllpListener",
    "RelaisConfig",
    "SmtpAccount",
    "SmtpListener",
    "TlsSettings",
    "load_config",
]

DEFAULT_VERSIONS = ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"]


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message says where and why."""


def _check_cidrs(v: list[str]) -> list[str]:
    for cidr in v:
        ipaddress.ip_network(cidr, strict=False)
    return v


Cidrs = Annotated[list[str], AfterValidator(_check_cidrs)]  # a peer allow-list, every entry a network


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Strict):
    """TLS on a listener; with `client_ca`, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"


class MllpListener(_Strict):
    name: str = "mllp"
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    max_frame_bytes: int = Field(10 * 1024 * 1024, gt=0)
    idle_timeout: float = Field(300.0, gt=0, description="seconds without a byte before closing")
    max_connections: int = Field(64, gt=0)
    allowed_senders: list[str] = Field(
        default_factory=list,
        description="'APP|FACILITY' (MSH-3.1|MSH-4.1), '*' matches anything; empty = all",
    )
    allowed_peers: Cidrs = Field(default_factory=list, description="CIDR; empty = all")
    accepted_versions: list[str] = Field(default_factory=lambda: list(DEFAULT_VERSIONS))
    validation: Literal["lenient", "strict"] = "lenient"
    required_fields: list[str] = Field(
        default_factory=list, description="terse paths that must be valued, e.g. 'PID-3'"
    )
    forbidden_fields: list[str] = Field(
        default_factory=list, description="paths that must be empty (IHE PAM France: PID-2...)"
    )
    default_charset: str = Field("iso-8859-15", description="used when MSH-18 is empty and the bytes are not UTF-8")
    tls: TlsSettings | None = None

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, v: list[str]) -> list[str]:
        for s in v:
            if s.count("|") != 1:
                raise ValueError(f"{s!r} is not 'APPLICATION|FACILITY'")
        return v

    @field_validator("default_charset")
    @classmethod
    def _charset(cls, v: str) -> str:
        import codecs

        codecs.lookup(v)
        return v


class HttpToken(_Strict):
    """One API client: its bearer token is kept only as a SHA-256 (tokens are random)."""

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the bearer token")
    roles: list[Literal["sender", "integrator", "auditor", "admin", "professional"]] = Field(min_length=1)
    sender: str = Field("", description="the identity its submissions are keyed by; default: name")


class HttpListener(_Strict):
    """The REST API (submissions, HL7 over HTTP, message status) on uvicorn, same loop."""

    name: str = "http"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    body_timeout: float = Field(30.0, gt=0, description="seconds to receive a whole request body")
    default_charset: str = Field("iso-8859-15", description="HL7 over HTTP: when MSH-18 is empty, not UTF-8")
    tls: TlsSettings | None = None
    tokens: list[HttpToken] = Field(default_factory=list)


class DicomListener(_Strict):
    """A DICOM C-STORE/C-ECHO receiver (storage SCP): one AE title on one port."""

    name: str = "dicom"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    ae_title: str = Field("RELAIS", min_length=1, max_length=16)
    allowed_calling_aets: list[str] = Field(default_factory=list, description="empty: any calling AE title")
    allowed_peers: Cidrs = Field(default_factory=list, description="CIDR; empty = all")
    max_pdu: int = Field(1024 * 1024, ge=128 * 1024, description="maximum PDU length we accept, bytes")
    max_associations: int = Field(32, gt=0)
    network_timeout: float = Field(60.0, gt=0, description="seconds without a byte before closing")
    store_timeout: float = Field(30.0, gt=0, description="seconds to wait for the commit before 0xA700")
    tls: TlsSettings | None = None


class SmtpAccount(_Strict):
    """A client allowed to submit mail; the password is kept only as a hash
    (`relais hash-password`: `scrypt$n$r$p$salt$hash` or `pbkdf2_sha256$iterations$salt$hash`)."""

    user: str = Field(min_length=1)
    password_hash: str = Field(pattern=r"^(scrypt|pbkdf2_sha256)\$")


class SmtpListener(_Strict):
    """MSSanté over SMTP: STARTTLS (TLS 1.2+) and AUTH are always required."""

    name: str = "smtp"
    host: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    hostname: str = Field("relais.localhost", description="the name in the banner and EHLO answer")
    domains: list[str] = Field(default_factory=list, description="accepted recipient domains")
    mailboxes: list[str] = Field(
        default_factory=list, description="accepted addresses; empty = any mailbox of `domains`"
    )
    max_message_bytes: int = Field(50 * 1024 * 1024, gt=0)
    timeout: float = Field(300.0, gt=0, description="seconds without a command before closing")
    accounts: list[SmtpAccount] = Field(default_factory=list)
    dev_account: bool = Field(
        False, description="create a development account at first start and print its password once"
    )
    tls: TlsSettings | None = Field(
        None, description="absent: a self-signed certificate made under the data folder (development only)"
    )
    mdn: dict[str, Any] | None = Field(
        None, description="relay for MDNs (smtp destination settings: host, port, mail_from...); absent: none sent"
    )
    mdn_max_attempts: int = Field(10, ge=1)
    readers: int = Field(0, ge=0, le=64, description="processes that read MIME and XDM archives; 0: on the event loop")
    max_connections: int = Field(64, gt=0)
    allowed_peers: Cidrs = Field(default_factory=list, description="CIDR; empty = all")


class Listeners(_Strict):
    mllp: list[MllpListener] = Field(default_factory=lambda: [MllpListener()])
    http: list[HttpListener] = Field(default_factory=list)
    dicom: list[DicomListener] = Field(default_factory=list)
    smtp: list[SmtpListener] = Field(default_factory=list)


class StoreSettings(_Strict):
    url: str = "sqlite:///data/relais.db"
    blob_dir: Path = Path("data/blobs")
    inline_payload_limit: int = Field(256 * 1024, ge=0)
    lock_timeout: float = Field(
        10.0, gt=0, description="seconds a commit waits for a locked SQLite database before failing"
    )
    checkpoint_interval: float = Field(
        5.0, gt=0, description="seconds between copies of the SQLite write-ahead log into the database file"
    )


class IngestSettings(_Strict):
    batch_window_ms: float = Field(
        0.0, ge=0, description="how long the writer waits for more submissions before committing"
    )
    max_batch: int = Field(256, gt=0)
    max_pending: int = Field(10000, gt=0, description="submissions queued before callers wait")
    acceptors: int = Field(
        0,
        ge=0,
        le=64,
        description="processes that run the MLLP and DICOM listeners and their intake; 0: in this process",
    )
    writer_process: bool = Field(
        False, description="commit in a process of its own, its GIL free of the listeners and delivery"
    )
    commit_on_loop: bool | None = Field(
        None,
        description="commit on the event loop, not a worker thread; unset: on the loop only when routing "
        "is off (with routing, intake then outruns delivery: bench/RESULTS.md §21, §28)",
    )


class LogSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class RoutingSettings(_Strict):
    routes_dir: Path = Field(Path("routes"), description="one TOML file per channel")
    enabled: bool = True
    delivery_concurrency: int = Field(32, gt=0)
    process: bool = Field(
        True,
        description="run the router and the delivery workers in their own process (off the writer's GIL)",
    )


class DicomSettings(_Strict):
    """Study assembly, whatever the listener the instances came by."""

    study_quiet_period: float = Field(
        60.0, gt=0, description="seconds without a new instance before a study is complete"
    )


class RelaisConfig(_Strict):
    store: StoreSettings = Field(default_factory=StoreSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    listeners: Listeners = Field(default_factory=Listeners)
    log: LogSettings = Field(default_factory=LogSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    base_dir: Path = Path(".")

    def commits_on_loop(self) -> bool:
        """Whether the single writer commits on the event loop (`[ingest] commit_on_loop`, or
        its default: only when nothing is routed; with routing, intake on the loop outruns
        delivery at high concurrency and the lag grows, bench/RESULTS.md §28)."""
        if self.ingest.commit_on_loop is not None:
            return self.ingest.commit_on_loop
        return not self.routing.enabled

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def store_url(self) -> str:
        url = self.store.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            return f"sqlite:///{self.resolve(Path(url[len('sqlite:///') :]))}"
        return url

    def open_store(self, *, writer: bool = False, checkpoints: bool = True) -> EventStore:
        """The event store this config names: the engine opens it as the one writer, the
        router process as a reader that leaves checkpoints to the engine, the CLI as a reader."""
        return EventStore.open(
            self.store_url,
            self.resolve(self.store.blob_dir),
            self.store.inline_payload_limit,
            self.store.lock_timeout,
            writer=writer,
            checkpoints=checkpoints,
            checkpoint_interval=self.store.checkpoint_interval,
        )


def load_config(path: Path) -> RelaisConfig:
    raw = read_toml(path, ConfigError, "configuration file")
    try:
        config = RelaisConfig.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, path)) from e
    names = [listener.name for listener in config.listeners.mllp]
    names += [listener.name for listener in config.listeners.dicom]
    names += [listener.name for listener in config.listeners.http]
    names += [listener.name for listener in config.listeners.smtp]
    if len(names) != len(set(names)):
        raise ConfigError(f"{path}: listeners: listener names must be unique (got {names})")
    for http in config.listeners.http:
        clients = [token.name for token in http.tokens]
        if len(clients) != len(set(clients)) or len({t.sha256 for t in http.tokens}) != len(clients):
            raise ConfigError(f"{path}: listeners.http ({http.name}): token names and digests must be unique")
    return config
