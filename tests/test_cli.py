"""The `relais` command line, run as a user would while the engine is running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hl7.client import MLLPClient

from engine.config import load_config
from tests.conftest import adt, start_relais, wait_for
from tests.test_routing import routed_relais, send, topics

RELAIS = str(Path(sys.executable).parent / "relais")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, port: int, store_url: str = "sqlite:///data/relais.db", level: str = "warning") -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\nblob_dir = "data/blobs"\n'
        f'[log]\nlevel = "{level}"\n[routing]\nenabled = false\n[[listeners.mllp]]\nname = "mllp"\nport = {port}\n'
    )
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RELAIS, "--config", str(config), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def engine(tmp_path: Path):
    config_path = write_config(tmp_path, 0)
    running = start_relais(load_config(config_path))
    yield config_path, running
    running.stop()


def test_list_and_show_while_the_engine_runs(engine) -> None:
    config_path, running = engine
    with MLLPClient("127.0.0.1", running.port) as client:
        client.send_message(adt("A01", control_id="CLI-1", ins="199017512345678"))
        client.send_message(adt("A03", control_id="CLI-2", sender=("AUTRE", "CLINIQUE")))
        client.send_message(adt("A28", control_id="CLI-3", ins=None))
    result = cli(config_path, "messages", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["control_id"] for r in rows] == ["CLI-3", "CLI-2", "CLI-1"]  # newest first
    assert {"id", "control_id", "sender", "message_type", "received_at"} <= rows[0].keys()
    by_type = cli(config_path, "messages", "list", "--json", "--type", "ADT^A03").stdout.splitlines()
    assert [json.loads(r)["control_id"] for r in by_type] == ["CLI-2"]
    by_sender = cli(config_path, "messages", "list", "--json", "--sender", "AUTRE").stdout.splitlines()
    assert [json.loads(r)["control_id"] for r in by_sender] == ["CLI-2"]
    # The identifier search index follows the log just after the ACK (not in its transaction).
    deadline = time.monotonic() + 10
    while not running.store.query("SELECT 1 AS x FROM relais_identifiers WHERE value = '199017512345678'"):
        assert time.monotonic() < deadline, "the search index did not catch up"
        time.sleep(0.05)
    by_patient = cli(config_path, "messages", "list", "--json", "--patient", "199017512345678").stdout
    assert [json.loads(r)["control_id"] for r in by_patient.splitlines()] == ["CLI-1"]
    future = cli(config_path, "messages", "list", "--json", "--since", "2999-01-01").stdout
    assert future == ""
    shown = cli(config_path, "messages", "show", rows[2]["id"], "--json")
    detail = json.loads(shown.stdout)
    assert detail["metadata"]["control_id"] == "CLI-1"
    assert [e["type"] for e in detail["events"]] == ["MessageReceived"]
    assert "199017512345678" in detail["payload"]
    human = cli(config_path, "messages", "show", rows[2]["id"])
    assert "MessageReceived" in human.stdout and "PID|1" in human.stdout


def test_show_unknown_message_fails_clearly(engine) -> None:
    config_path, _ = engine
    result = cli(config_path, "messages", "show", "00000000-0000-0000-0000-000000000000")
    assert result.returncode == 1 and "no message" in result.stderr
    assert cli(config_path, "messages", "show", "not-an-id").returncode == 2


def test_verify_and_check_report_a_healthy_store(engine) -> None:
    config_path, running = engine
    with MLLPClient("127.0.0.1", running.port) as client:
        for _ in range(3):
            client.send_message(adt())
    verify = cli(config_path, "verify")
    assert verify.returncode == 0 and "chain ok" in verify.stdout and "events: 3" in verify.stdout
    check = cli(config_path, "check")
    assert check.returncode == 0 and "missing payloads (events whose bytes are gone): 0" in check.stdout


def test_bad_config_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[listeners.mllp]]\nport = "deux mille"\n')
    result = cli(path, "messages", "list")
    assert result.returncode == 2
    assert f"{path}: listeners.mllp[0].port:" in result.stderr and "integer" in result.stderr
    path.write_text("[store]\nurl = 'sqlite:///x.db'\nunknown_key = 1\n")
    result = cli(path, "verify")
    assert "store.unknown_key" in result.stderr and "Extra inputs are not permitted" in result.stderr
    assert "no such configuration file" in cli(tmp_path / "absent.toml", "verify").stderr


@pytest.mark.parametrize("loop", ["", "asyncio"])
def test_relais_run_serves_and_stops_on_sigterm(tmp_path: Path, loop: str) -> None:
    port = free_port()
    config_path = write_config(tmp_path, port, level="info")
    env = {**os.environ, "RELAIS_EVENT_LOOP": loop}
    proc = subprocess.Popen([RELAIS, "--config", str(config_path), "run"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with MLLPClient("127.0.0.1", port) as client:
                    ack = client.send_message(adt(control_id="RUN-1"))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "relais run did not start listening"
                time.sleep(0.1)
        assert b"MSA|AA|RUN-1" in ack
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry["event"] == "relais_stopped" for entry in logs)
    [started] = [entry for entry in logs if entry["event"] == "relais_started"]
    assert started["event_loop"] == (loop or "uvloop")  # uvloop unless asked otherwise
    assert started["commit"] == "loop"  # routing off: the writer commits on the loop
    [received] = [entry for entry in logs if entry["event"] == "message_received"]
    assert received["control_id"] == "RUN-1" and received["message_id"]
    # Logs carry identifiers of events, never patient identity (the INS, the name).
    assert "260058815400233" not in stderr and "MARTIN" not in stderr
    assert (tmp_path / "data" / "relais.db").exists() and (tmp_path / "data" / "blobs").is_dir()
    assert os.access(tmp_path / "data" / "relais.db", os.R_OK)


@pytest.mark.parametrize(
    ("routing", "ingest", "expected"),
    [
        ("", "", False),  # routing: intake on the loop would outrun delivery
        ("process = false", "", False),
        ("enabled = false", "", True),  # intake alone: the loop commits faster
        ("process = false", "commit_on_loop = true", True),  # what is asked wins
        ("enabled = false", "commit_on_loop = false", False),
    ],
)
def test_where_the_writer_commits_by_default(tmp_path: Path, routing: str, ingest: str, expected: bool) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[routing]\n{routing}\n[ingest]\n{ingest}\n")
    assert load_config(path).commits_on_loop() is expected


def test_an_unknown_event_loop_is_refused_by_name(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, free_port())
    env = {**os.environ, "RELAIS_EVENT_LOOP": "tokio"}
    result = subprocess.run([RELAIS, "--config", str(config_path), "run"], capture_output=True, text=True,
                            timeout=60, env=env)  # fmt: skip
    assert result.returncode == 1
    assert "not started: RELAIS_EVENT_LOOP='tokio': expected one of uvloop, asyncio" in result.stderr


def test_postgresql_store_url_works_end_to_end(pg_url: str, tmp_path: Path) -> None:
    config_path = write_config(tmp_path, 0, store_url=pg_url)
    running = start_relais(load_config(config_path))
    try:
        with MLLPClient("127.0.0.1", running.port) as client:
            assert b"MSA|AA|PG-1" in client.send_message(adt(control_id="PG-1"))
            assert b"MSA|AA|PG-1" in client.send_message(adt(control_id="PG-1"))  # resend
    finally:
        running.stop()
    rows = [json.loads(r) for r in cli(config_path, "messages", "list", "--json").stdout.splitlines()]
    assert [r["control_id"] for r in rows] == ["PG-1"]
    detail = json.loads(cli(config_path, "messages", "show", rows[0]["id"], "--json").stdout)
    assert [e["type"] for e in detail["events"]] == ["MessageReceived", "DuplicateReceived"]
    assert cli(config_path, "verify").returncode == 0


def test_a_second_engine_on_the_same_store_is_refused(engine) -> None:
    config_path, running = engine
    result = subprocess.run([RELAIS, "--config", str(config_path), "run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not started" in result.stderr and "already writing" in result.stderr
    with MLLPClient("127.0.0.1", running.port) as client:  # the first one is unharmed
        assert b"MSA|AA" in client.send_message(adt())
    assert cli(config_path, "messages", "list", "--json").returncode == 0  # readers are welcome


def test_a_second_engine_on_the_same_postgresql_store_is_refused(pg_url: str, tmp_path: Path) -> None:
    from event_store.writer_lock import StoreBusy

    first = start_relais(load_config(write_config(tmp_path, 0, store_url=pg_url)))
    try:
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(StoreBusy):
            start_relais(load_config(write_config(other, 0, store_url=pg_url)))
    finally:
        first.stop()


def test_status_shows_volumes_follower_lag_and_outbox(relais, tmp_path: Path) -> None:
    partner = relais()
    port = partner.port
    partner.stop()
    hub = routed_relais(relais, tmp_path, port, attempts=50)
    assert send(hub.port, adt("A01", control_id="ST-1")) == "AA"
    assert send(hub.port, "not hl7") == "AR"
    wait_for(lambda: "DeliveryFailed" in topics(hub, "ST-1"), what="a failed attempt")
    config = tmp_path / "relais1" / "config.toml"
    config.write_text('[store]\nurl = "sqlite:///relais.db"\nblob_dir = "blobs"\n')
    out = subprocess.run([RELAIS, "--config", str(config), "status", "--json"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    status = json.loads(out.stdout)
    assert status["messages"]["accepted"]["count"] == 1 and status["messages"]["reject"]["count"] == 1
    assert status["followers"]["router"]["position"] >= 1
    assert {"channel": "to-partner", "destination": "partner", "state": "pending", "n": 1} in status["outbox"]
    # The partner is down: status names it, with the error of its latest attempt.
    [failing] = status["failing"]
    assert (failing["channel"], failing["destination"], failing["deliveries"]) == ("to-partner", "partner", 1)
    assert "refused" in failing["last_error"].lower() and failing["next_attempt_at"] >= failing["last_failed_at"]
    text = subprocess.run([RELAIS, "--config", str(config), "status"], capture_output=True, text=True, timeout=60)
    assert "failing to-partner/partner: 1 pending" in text.stdout


def test_json_log_lines_take_whatever_a_call_gives() -> None:
    """Each log line is one JSON object, also for values orjson refuses; none is lost."""
    code = (
        "from engine.logs import configure_logging; import structlog\n"
        "configure_logging('info', 'json'); log = structlog.get_logger('t')\n"
        "log.info('plain', message_id='m-1', size=3)\n"
        "log.info('odd', big=2**70, keyed={1: 'x'}, thing=object())\n"
        "log.debug('hidden', message_id='m-2')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("plain", "info"), ("odd", "info")]
    assert lines[0]["message_id"] == "m-1" and lines[1]["big"] == 2**70 and lines[1]["keyed"] == {"1": "x"}
