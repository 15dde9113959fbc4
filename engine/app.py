"""The Relais process: opens the store, starts the writer and the listeners, stops cleanly.

>>> app = RelaisApp(load_config(Path("config.toml")))
>>> await app.start(); ...; await app.stop()
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import ssl
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from connectors.mllp import MllpServer
from connectors.rest import RestServer
from engine.acceptors import AcceptorPool, IngestGateway
from engine.config import DicomListener, MllpListener, RelaisConfig, TlsSettings
from engine.delivery import DeliveryWorkers
from engine.hl7_intake import Hl7Intake
from engine.identity_feed import ensure_identity_tables
from engine.indexer import SearchIndexer
from engine.ingest import Ingestor, Submitter, Writer
from engine.loop import loop_kind
from engine.router import Router, RoutingDecisions
from engine.router_process import RouterProcess
from engine.routes import Channel, RouteError, load_channels
from engine.targets import build_targets
from engine.writer_process import WriterProcess
from event_store import EventStore

__all__ = ["RelaisApp", "server_ssl_context"]

log = structlog.get_logger("relais.app")


def server_ssl_context(tls: TlsSettings, config: RelaisConfig) -> ssl.SSLContext:
    """A server context from the listener's TLS settings (TLS 1.2+ only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.resolve(tls.cert), config.resolve(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=config.resolve(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("tls.require_client_cert needs tls.client_ca")
    return ctx


def listener_servers(
    cfg: RelaisConfig,
    ingestor: Submitter,
    decisions: Callable[[uuid.UUID], Awaitable[Any]] | None,
    reuse_port: bool = False,
) -> list[MllpServer]:
    """The MLLP listeners of the config, each with its HL7 intake (not started)."""
    return [
        MllpServer(
            name=listener.name,
            host=listener.host,
            port=listener.port,
            handler=Hl7Intake(listener, ingestor, decisions=decisions),
            max_frame_bytes=listener.max_frame_bytes,
            idle_timeout=listener.idle_timeout,
            max_connections=listener.max_connections,
            allowed_peers=listener.allowed_peers,
            ssl_context=server_ssl_context(listener.tls, cfg) if listener.tls else None,
            reuse_port=reuse_port,
        )
        for listener in cfg.listeners.mllp
    ]


class RelaisApp:
    def __init__(self, config: RelaisConfig) -> None:
        self.config = config
        self.store: EventStore | None = None
        self.ingestor: Writer | None = None
        self.mllp: dict[str, MllpServer] = {}
        self.http: dict[str, RestServer] = {}
        self.smtp: dict[str, Any] = {}  # name -> connectors.smtp.SmtpServer
        self.mail: Any = None  # engine.smtp_setup.MailServices: SMTP listeners, MDN planner and sender
        self.router: Router | None = None
        self.router_process: RouterProcess | None = None  # [routing] process = true
        self.decisions: RoutingDecisions | None = None
        self.channels: list[Channel] = []
        self.delivery: DeliveryWorkers | None = None
        self.indexer: SearchIndexer | None = None
        self.gateway: IngestGateway | None = None
        self.acceptors: AcceptorPool | None = None
        self.listening = config
        self.dicom: dict[str, Any] = {}  # name -> connectors.dicom.DicomServer
        self.studies: Any = None  # engine.study_assembly.StudyAssembler
        self.study_router: Any = None  # engine.study_router.StudyRouter

    @property
    def routes_dir(self) -> Path:
        return self.config.resolve(self.config.routing.routes_dir)

    async def reload_routes(self) -> list[str]:
        """Load routes/ again; a bad file is refused and the running routes stay."""
        if self.decisions is None:
            raise RuntimeError("routing is not running")
        channels = await asyncio.to_thread(load_channels, self.routes_dir)
        self.channels = channels
        if self.router_process is not None:  # its delivery workers too
            await self.router_process.reload(channels)
        if self.router is not None:
            self.router.reload(channels)
        if self.delivery is not None:
            assert self.store is not None and self.ingestor is not None
            await self.delivery.reload(build_targets(channels, self.store, self.ingestor))
        if self.study_router is not None:
            self.study_router.reload(channels)
        log.info("routes_reloaded", channels=[c.name for c in channels])
        return [c.name for c in channels]

    async def start(self) -> None:
        """Open the store, start routing and listeners; on any failure, undo what started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        # The writer thread gives up the GIL on every SQLite call and must get it back from
        # the busy event loop; the default 5 ms switch interval then adds milliseconds to
        # every commit, and so to every ACK.
        sys.setswitchinterval(0.0005)
        self.store = await asyncio.to_thread(functools.partial(cfg.open_store, writer=True))
        await asyncio.to_thread(ensure_identity_tables, self.store)
        removed = await asyncio.to_thread(self.store.blobs.remove_incomplete_writes)
        if removed:
            log.warning("incomplete_blob_writes_removed", count=removed)
        if cfg.ingest.writer_process:
            self.ingestor = WriterProcess(cfg)
        else:
            self.ingestor = Ingestor(
                self.store,
                batch_window_ms=cfg.ingest.batch_window_ms,
                max_batch=cfg.ingest.max_batch,
                max_pending=cfg.ingest.max_pending,
                on_loop=cfg.commits_on_loop(),
            )
        await self.ingestor.start()
        if cfg.routing.enabled:
            channels = await asyncio.to_thread(load_channels, self.routes_dir)  # RouteError: refuse to start
            self.channels = channels
            self.decisions = RoutingDecisions(self.store)
            if cfg.routing.process:  # routing and delivery in the router process
                self.router_process = RouterProcess(cfg, self.ingestor, self.decisions, channels)
                await self.router_process.start()
            else:
                self.router = Router(self.store, self.ingestor, channels, self.decisions)
                await self.router.start()
                self.delivery = DeliveryWorkers(
                    self.store, self.ingestor, build_targets(channels, self.store, self.ingestor),
                    cfg.routing.delivery_concurrency,
                )  # fmt: skip
                await self.delivery.start()
        if self.router_process is None:  # else the router process keeps the search index
            self.indexer = SearchIndexer(self.store, self.ingestor)
            await self.indexer.start()
        decisions = self.decisions.decision if self.decisions else None
        if cfg.ingest.acceptors:
            # MLLP and DICOM listeners live in acceptor processes; this one keeps the store
            # and the writer.
            # A short private folder: Unix socket paths are limited to ~100 bytes.
            sock_dir = Path(tempfile.mkdtemp(prefix="relais-"))
            self.gateway = IngestGateway(sock_dir / "ingest.sock", self.ingestor, decisions)
            await self.gateway.start()
            self.acceptors = AcceptorPool(cfg, self.gateway.path, cfg.ingest.acceptors, decisions is not None)
            self.listening = await self.acceptors.start()
        else:
            for server in listener_servers(cfg, self.ingestor, decisions):
                await server.start()
                self.mllp[server.name] = server
        for http_listener in cfg.listeners.http:
            rest = RestServer(http_listener, self.ingestor, self.store, decisions,
                              server_ssl_context(http_listener.tls, cfg) if http_listener.tls else None)  # fmt: skip
            self.http[rest.name] = rest
            await rest.start()
        await self._start_dicom()
        if cfg.listeners.smtp:
            from engine.smtp_setup import MailServices

            self.mail = MailServices(cfg, self.store, self.ingestor, cfg.resolve(cfg.store.blob_dir).parent)
            self.smtp = self.mail.servers
            await self.mail.start()
        commit = "writer process" if cfg.ingest.writer_process else ("loop" if cfg.commits_on_loop() else "thread")
        log.info("relais_started", store=self.store.dialect, acceptors=cfg.ingest.acceptors, event_loop=loop_kind(),
                 commit=commit, router_process=self.router_process.pid if self.router_process else None,
                 listeners=[listener.name for listener in cfg.listeners.mllp])  # fmt: skip

    async def _start_dicom(self) -> None:
        """DICOM listeners (here, or in the acceptor processes) and study assembly."""
        from engine.dicom_intake import dicom_servers
        from engine.study_assembly import StudyAssembler

        assert self.store is not None and self.ingestor is not None
        self.studies = StudyAssembler(self.store, self.ingestor, self.config.dicom.study_quiet_period)
        await self.studies.start()
        if self.decisions is not None:
            from engine.study_router import StudyRouter

            self.study_router = StudyRouter(self.store, self.ingestor, self.channels)
            await self.study_router.start()
        if self.acceptors is not None:
            return  # the listeners live in the acceptor processes
        ctx = functools.partial(server_ssl_context, config=self.config)
        for server in dicom_servers(
            self.config.listeners.dicom, self.ingestor, self.store.blobs, ctx, self.store.inline_limit
        ):
            await server.start()
            self.dicom[server.name] = server

    def port_of(self, name: str) -> int:
        """The port a listener is bound to (useful when the config says 0)."""
        if name in self.mllp:
            return self.mllp[name].bound_port
        if name in self.http:
            return self.http[name].bound_port
        if name in self.dicom:
            return int(self.dicom[name].bound_port)
        if name in self.smtp:
            return int(self.smtp[name].bound_port)
        listeners: list[MllpListener | DicomListener] = [
            *self.listening.listeners.mllp,
            *self.listening.listeners.dicom,
        ]
        return next(listener.port for listener in listeners if listener.name == name)

    async def stop(self) -> None:
        if self.acceptors is not None:
            await self.acceptors.stop()
            self.acceptors = None
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self.mail is not None:
            await self.mail.stop()
            self.mail = None
        for server in self.mllp.values():
            await server.stop()
        self.mllp.clear()
        for rest in self.http.values():
            await rest.stop()
        self.http.clear()
        for dicom in self.dicom.values():
            await dicom.stop()
        self.dicom.clear()
        if self.studies is not None:
            await self.studies.stop()
        if self.study_router is not None:
            await self.study_router.stop()
        if self.indexer is not None:
            await self.indexer.stop()
        if self.router is not None:
            await self.router.stop()
        if self.router_process is not None:
            await self.router_process.stop()
        if self.delivery is not None:
            await self.delivery.stop()
        if self.ingestor is not None:
            await self.ingestor.stop()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        log.info("relais_stopped")

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            task = asyncio.ensure_future(self._reload_on_signal())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await self.start()
        pidfile = self.config.resolve(self.config.store.blob_dir).parent / "relais.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        try:
            await stop.wait()
        finally:
            pidfile.unlink(missing_ok=True)
            await self.stop()

    async def _reload_on_signal(self) -> None:
        try:
            await self.reload_routes()
        except RouteError as e:
            log.error("routes_reload_refused", errors=str(e).splitlines()[:20])
        except Exception as e:
            log.error("routes_reload_failed", error=type(e).__name__, detail=str(e)[:200])
