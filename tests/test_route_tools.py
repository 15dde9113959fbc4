"""The integrators' route commands, run as a user would: check, test, try (dry-run), reload."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hl7.client import MLLPClient

from engine.config import load_config
from tests.conftest import adt, start_relais

RELAIS = str(Path(sys.executable).parent / "relais")
ROOT = Path(__file__).resolve().parent.parent


def relais_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RELAIS, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_shipped_example_channels_check_and_pass_their_tests() -> None:
    checked = relais_cli("--config", str(ROOT / "config.toml"), "routes", "check")
    assert checked.returncode == 0, checked.stderr
    assert "adt-to-partner" in checked.stdout and "admissions-to-gp" in checked.stdout
    tested = relais_cli("--config", str(ROOT / "config.toml"), "routes", "test")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "0 failed" in tested.stdout and "FAIL" not in tested.stdout


def test_routes_check_names_file_key_and_expectation(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "bad.toml").write_text(
        '[filter]\nfield = "PID-3"\n[[destination]]\nname = "x"\ntype = "mllp"\n[destination.settings]\nhost = "h"\n'
    )
    out = relais_cli("--config", str(ROOT / "config.toml"), "routes", "check", "--routes", str(routes))
    assert out.returncode == 1
    assert "bad.toml: filter:" in out.stderr and "exactly one of equals" in out.stderr
    (routes / "bad.toml").write_text('[[destination]]\nname = "x"\ntype = "mllp"\n[destination.settings]\nport = 1\n')
    out = relais_cli("--config", str(ROOT / "config.toml"), "routes", "check", "--routes", str(routes))
    assert "bad.toml: destination[0] (x):" in out.stderr and "host" in out.stderr


def test_failing_route_test_is_reported(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    (routes / "samples").mkdir(parents=True)
    (routes / "samples" / "a01.er7").write_text(adt("A01").replace("\r", "\n"))
    (routes / "c.toml").write_text(
        '[[transform]]\nset = "MSH-5"\nvalue = "X"\n'
        '[[destination]]\nname = "d"\ntype = "file"\n[destination.settings]\nfolder = "out"\n'
        '[[test]]\ninput = "samples/a01.er7"\nexpect_destinations = ["d"]\nexpect_fields = { "MSH-5" = "Y" }\n'
    )
    out = relais_cli("--config", str(ROOT / "config.toml"), "routes", "test", "--routes", str(routes))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "MSH-5: expected 'Y', got 'X'" in out.stdout


def write_config(folder: Path, port: int, routing: bool) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[store]\nurl = "sqlite:///data/relais.db"\nblob_dir = "data/blobs"\n[log]\nlevel = "info"\n'
        f"[routing]\nenabled = {'true' if routing else 'false'}\n"
        f'[[listeners.mllp]]\nname = "mllp"\nport = {port}\n'
    )
    return path


def test_dry_run_on_history_reports_what_would_be_sent_and_sends_nothing(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, 0, routing=False)
    running = start_relais(load_config(config_path))
    try:
        with MLLPClient("127.0.0.1", running.port) as client:
            for trigger in ("A01", "A01", "A03", "A28"):
                client.send_message(adt(trigger))
            client.send_message(adt("A01", sender=("AUTRE", "CLINIQUE")))
    finally:
        running.stop()
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(
        '[filter]\nall = [{ message_type = "ADT^A0*" }, { sender = "SIH_CHU|*" }]\n'
        '[[transform]]\nset = "MSH-5"\nvalue = "NOUVEAU"\n'
        '[[destination]]\nname = "new-partner"\ntype = "file"\n[destination.settings]\nfolder = "never"\n'
    )
    out = relais_cli("--config", str(config_path), "routes", "try", str(candidate), "--since", "2000-01-01")
    assert out.returncode == 0, out.stderr
    assert "messages examined: 5, routed: 3, not routed: 2" in out.stdout
    assert "new-partner: 3" in out.stdout
    assert "message type ADT^A28" in out.stdout and "sender AUTRE|CLINIQUE not matched" in out.stdout
    assert "+ MSH|^~\\&|SIH_CHU|CHU_EXEMPLE|NOUVEAU|" in out.stdout
    assert not (tmp_path / "never").exists()


def test_sighup_reload_keeps_connections_and_refuses_a_bad_file(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config_path = write_config(tmp_path, port, routing=True)
    routes = tmp_path / "routes"
    routes.mkdir()
    proc = subprocess.Popen([RELAIS, "--config", str(config_path), "run"], stderr=subprocess.PIPE, text=True)
    try:
        client = None
        deadline = time.monotonic() + 20
        while client is None:
            try:
                client = MLLPClient("127.0.0.1", port)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with client:
            assert b"MSA|AA" in client.send_message(adt("A01"))
            (routes / "drop.toml").write_text(
                '[[destination]]\nname = "drop"\ntype = "file"\n[destination.settings]\nfolder = "../out"\n'
            )
            assert relais_cli("--config", str(config_path), "routes", "reload").returncode == 0
            time.sleep(0.5)
            assert b"MSA|AA" in client.send_message(adt("A01", control_id="AFTER-RELOAD"))  # same connection
            deadline = time.monotonic() + 15
            while not list((tmp_path / "out").glob("[!.]*")) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(list((tmp_path / "out").glob("[!.]*"))) >= 1
            (routes / "broken.toml").write_text("this is = not [valid")
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert b"MSA|AA" in client.send_message(adt("A01"))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [entry["event"] for entry in logs]
    assert "routes_reloaded" in events and "routes_reload_refused" in events
    # One line per delivery at the default level, none from the connector besides it, and no
    # file name (a document's own can name the patient): the delivery id says which it was.
    written = list((tmp_path / "out").glob("[!.]*"))
    delivered = [entry for entry in logs if entry["event"] == "delivered"]
    assert len(delivered) == len(written) and all(d["destination"] == "drop" for d in delivered)
    assert "file_delivered" not in events
    assert not any(path.name in stderr for path in written)


def test_metadata_filter_reads_what_the_edge_extracted(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    (routes / "samples").mkdir(parents=True)
    (routes / "samples" / "ins.er7").write_text(adt("A01", reliability="VALI"))
    (routes / "samples" / "prov.er7").write_text(adt("A01", reliability="PROV"))
    (routes / "m.toml").write_text(
        '[filter]\nall = [{ metadata = "identity_reliability", equals = "VALI" },'
        ' { metadata = "visit_number", exists = true }]\n'
        '[[destination]]\nname = "d"\ntype = "file"\n[destination.settings]\nfolder = "out"\n'
        '[[test]]\ninput = "samples/ins.er7"\nexpect_destinations = ["d"]\n'
        '[[test]]\ninput = "samples/prov.er7"\nexpect_destinations = []\n'
    )
    out = relais_cli("--config", str(ROOT / "config.toml"), "routes", "test", "--routes", str(routes))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed, 0 failed" in out.stdout
