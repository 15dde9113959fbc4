"""Builds the SMTP listeners of the config: TLS context (the configured certificate, or a
self-signed one made under the data folder for development), accounts (hashed passwords,
plus an optional development account whose password is printed once), intake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import secrets
import ssl
import sys
from pathlib import Path

import structlog

from connectors.smtp import PasswordCheck, SmtpServer, hash_password
from engine.config import RelaisConfig, SmtpListener
from engine.ingest import Submitter, Writer
from engine.mail_intake import MailIntake
from engine.mdn import MDN_CHANNEL, MdnDelivery, MdnPlanner
from engine.targets import Target
from event_store import EventStore

__all__ = ["DEV_USER", "MailServices", "dev_certificate", "smtp_servers"]

log = structlog.get_logger("relais.smtp")

DEV_USER = "dev@relais.localhost"


def dev_certificate(folder: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate for `hostname`, 127.0.0.1 and localhost, made once."""
    cert_path, key_path = folder / "smtp-dev-cert.pem", folder / "smtp-dev-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    san = [x509.DNSName(hostname), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.warning("smtp_self_signed_certificate_created", path=str(cert_path), fit_for="development only")
    return cert_path, key_path


def _dev_account(folder: Path) -> str:
    """The development account's password hash; created (and its password printed) once."""
    path = folder / "smtp-dev-account"
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    hashed = hash_password(password)
    path.touch(mode=0o600)
    path.write_text(hashed + "\n")
    # Printed, never logged: logs are kept and shipped, this is for the developer at the console.
    print(
        f"Relais development SMTP account (shown once, fit for development only): user {DEV_USER} password {password}",
        file=sys.stderr,
        flush=True,
    )
    return hashed


def _tls_context(listener: SmtpListener, cfg: RelaisConfig, data_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if listener.tls is not None:
        from engine.app import server_ssl_context

        ctx = server_ssl_context(listener.tls, cfg)
    else:
        cert, key = dev_certificate(data_dir / "tls", listener.hostname)
        ctx.load_cert_chain(cert, key)
    ctx.minimum_version = max(ctx.minimum_version, ssl.TLSVersion.TLSv1_2)
    return ctx


def smtp_servers(cfg: RelaisConfig, ingestor: Submitter, data_dir: Path) -> list[SmtpServer]:
    """The SMTP listeners of the config, not started."""
    servers = []
    for listener in cfg.listeners.smtp:
        accounts = {a.user: a.password_hash for a in listener.accounts}
        if listener.dev_account:
            accounts.setdefault(DEV_USER, _dev_account(data_dir))
        if not accounts:
            log.warning("smtp_no_account", listener=listener.name, detail="no client can authenticate")
        servers.append(
            SmtpServer(
                listener.name,
                listener.host,
                listener.port,
                MailIntake(listener, ingestor, cfg.store.inline_payload_limit),
                hostname=listener.hostname,
                tls_context=_tls_context(listener, cfg, data_dir),
                authenticator=PasswordCheck(accounts),
                data_size_limit=listener.max_message_bytes,
                timeout=listener.timeout,
                max_connections=listener.max_connections,
                allowed_peers=listener.allowed_peers,
            )
        )
    return servers


class MailServices:
    """The SMTP listeners and, where a listener has an MDN relay, the MDN planner and its
    delivery workers: started and stopped together by the app."""

    def __init__(self, cfg: RelaisConfig, store: EventStore, ingestor: Writer, data_dir: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.ingestor = ingestor
        self.data_dir = data_dir
        self.servers: dict[str, SmtpServer] = {}
        self.planner: MdnPlanner | None = None
        self.delivery: MdnDelivery | None = None

    def _mdn_targets(self) -> dict[tuple[str, str], Target]:
        from connectors.registry import build_destination
        from engine.routes import DestinationSpec

        targets = {}
        for listener in self.cfg.listeners.smtp:
            if listener.mdn is None:
                continue
            spec = DestinationSpec(name=listener.name, type="smtp", ordering_key="none", on_failure="skip",
                                   max_attempts=listener.mdn_max_attempts, settings=listener.mdn)  # fmt: skip
            destination = build_destination(f"{listener.name}-mdn", "smtp", listener.mdn, self.cfg.base_dir)
            targets[(MDN_CHANNEL, listener.name)] = Target(spec, destination)
        return targets

    async def start(self) -> None:
        targets = self._mdn_targets()  # ValueError on bad settings: refuse to start
        for smtp in await asyncio.to_thread(smtp_servers, self.cfg, self.ingestor, self.data_dir):
            await asyncio.to_thread(smtp.handler.start_readers)
            self.servers[smtp.name] = smtp
            await smtp.start()
        if targets:
            senders = {
                listener.name: (listener.hostname, str((listener.mdn or {}).get("mail_from", "")))
                for listener in self.cfg.listeners.smtp
                if listener.mdn is not None
            }
            self.planner = MdnPlanner(self.store, self.ingestor, senders)
            self.delivery = MdnDelivery(self.store, self.ingestor, targets, concurrency=4)
            await self.planner.start()
            await self.delivery.start()

    async def stop(self) -> None:
        for smtp in self.servers.values():
            await smtp.stop()
            await asyncio.to_thread(smtp.handler.stop_readers)
        self.servers.clear()
        if self.planner is not None:
            await self.planner.stop()
            self.planner = None
        if self.delivery is not None:
            await self.delivery.stop()
            self.delivery = None
