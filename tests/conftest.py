"""Shared fixtures: a real Relais on loopback (own thread and event loop), message builders,
and the PostgreSQL service (a failure, not a skip, when CI=true and it is down)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine import loop as event_loop
from engine.app import RelaisApp
from engine.config import RelaisConfig
from event_store import EventStore


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Async tests, and the clients they drive, run on the loop Relais runs on (uvloop)."""
    return {"relais": event_loop.new_event_loop}


PG_URL = os.environ.get("RELAIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class RunningRelais:
    app: RelaisApp
    config: RelaisConfig
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def port(self) -> int:
        return next(iter(self.app.mllp.values())).bound_port

    def port_of(self, name: str) -> int:
        return self.app.mllp[name].bound_port

    @property
    def store(self) -> EventStore:
        assert self.app.store is not None
        return self.app.store

    def loop_call(self, coro: Any) -> Any:
        """Run a coroutine on the engine's own loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            # Closed here, not by the garbage collector at some later moment: a loop closed
            # then closes descriptors whose numbers other tests' sockets may have taken.
            self.loop.close()


def make_config(tmp_path: Path, *, store_url: str | None = None, **overrides: Any) -> RelaisConfig:
    """A config on tmp_path with one MLLP listener on a free port; overrides are merged."""
    listeners = overrides.pop("listeners", None) or {"mllp": [{"name": "mllp", "port": 0}]}
    raw: dict[str, Any] = {
        "store": {"url": store_url or "sqlite:///relais.db", "blob_dir": "blobs"},
        "listeners": listeners,
        "log": {"level": "warning"},
        "routing": {"enabled": False},
        "base_dir": tmp_path,
        **overrides,
    }
    return RelaisConfig.model_validate(raw)


def start_relais(config: RelaisConfig) -> RunningRelais:
    loop = event_loop.new_event_loop()  # the loop `relais run` runs on (uvloop)
    started = threading.Event()
    error: list[BaseException] = []
    app = RelaisApp(config)

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                await app.start()
            except BaseException as e:
                error.append(e)
            finally:
                started.set()

        boot_task = loop.create_task(boot())
        loop.run_forever()
        del boot_task

    thread = threading.Thread(target=run, name="relais-under-test", daemon=True)
    thread.start()
    started.wait(30)
    if error:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        raise error[0]
    return RunningRelais(app, config, loop, thread)


@pytest.fixture
def relais(tmp_path: Path) -> Iterator[Callable[..., RunningRelais]]:
    """Factory: `relais(listeners=..., store_url=...)` starts Relais; all are stopped after."""
    started: list[RunningRelais] = []

    def factory(**overrides: Any) -> RunningRelais:
        home = tmp_path / f"relais{len(started)}"
        home.mkdir()
        running = start_relais(make_config(home, **overrides))
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema-less database state: tables dropped before and after."""
    if not postgres_available():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and CI=true")
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432 (start it to run this test)")
    _drop_pg_tables()
    yield PG_URL
    _drop_pg_tables()


def _drop_pg_tables() -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres", autocommit=True) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND (tablename = 'stored_events' OR tablename LIKE 'relais\\_%')"
        ).fetchall()
        for (table,) in tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        conn.execute("DROP TYPE IF EXISTS stored_event_uuid CASCADE")
        conn.execute("DROP TYPE IF EXISTS stored_event_text CASCADE")


def adt(
    trigger: str = "A01",
    *,
    control_id: str | None = None,
    sender: tuple[str, str] = ("SIH_CHU", "CHU_EXEMPLE"),
    version: str = "2.5^FRA^2.11",
    accept_ack: str = "",
    app_ack: str = "",
    charset: str = "UNICODE UTF-8",
    ipp: str = "123456",
    ins: str | None = "260058815400233",
    reliability: str = "VALI",
    family: str = "MARTIN",
    extra_segments: tuple[str, ...] = (),
) -> str:
    """An IHE PAM France ADT message written for these tests (segments joined by CR)."""
    control_id = control_id or uuid.uuid4().hex[:20]
    structure = {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A28": "ADT_A05",
                 "A31": "ADT_A05", "A40": "ADT_A39", "A47": "ADT_A30"}.get(trigger, "ADT_A01")  # fmt: skip
    ids = f"{ipp}^^^CHU_EXEMPLE&1.2.250.1.71.4.2.2&ISO^PI"
    if ins:
        ids += f"~{ins}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    pid = ["PID", "1", "", ids, "", f"{family}^Claire^^^^^L", "", "19850615", "F"]
    pid += [""] * (32 - len(pid)) + [reliability]
    msh = ["MSH", "^~\\&", sender[0], sender[1], "RELAIS", "GRADES", "20261123101500", "",
           f"ADT^{trigger}^{structure}", control_id, "P", version, "", "", accept_ack, app_ack,
           "FRA", charset, "", "", "2.11^IHE_FRANCE-2.11-PAM"]  # fmt: skip
    segments = [
        "|".join(msh).rstrip("|"),
        "EVN||20261123101500|||||CHU_EXEMPLE",
        "|".join(pid),
        "|".join(["PV1", "1", "I", "CARDIO^101^1", *[""] * 15, "V20261123001"]),
        *extra_segments,
    ]
    return "\r".join(segments) + "\r"


@pytest.fixture
def mqtt_broker() -> int:
    """The Mosquitto broker on 127.0.0.1:1883 (a failure, not a skip, when CI=true)."""
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            return 1883
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("Mosquitto is not reachable on 127.0.0.1:1883 and CI=true")
        pytest.skip("Mosquitto is not running on 127.0.0.1:1883 (mosquitto -d to run this test)")


def wait_for(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail naming `what` after `timeout`
    (a safety net, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
