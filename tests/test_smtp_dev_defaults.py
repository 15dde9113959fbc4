"""The shipped config.toml takes mail out of the box: STARTTLS with a self-signed certificate
made at first start under the data folder and a development account printed once."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

from connectors.smtp import verify_password
from engine.config import Listeners, RelaisConfig, RoutingSettings, load_config
from tests.conftest import start_relais
from tests.mail_samples import Mail, xdm_zip
from tests.test_smtp_listener import client_tls

ROOT = Path(__file__).resolve().parent.parent


def shipped_config(folder: Path) -> RelaisConfig:
    """config.toml as shipped, in a scratch folder, on free ports."""
    shutil.copy(ROOT / "config.toml", folder / "config.toml")
    cfg = load_config(folder / "config.toml")
    listeners = Listeners(
        mllp=[m.model_copy(update={"port": 0}) for m in cfg.listeners.mllp],
        smtp=[s.model_copy(update={"port": 0}) for s in cfg.listeners.smtp],
    )
    return cfg.model_copy(update={"listeners": listeners, "routing": RoutingSettings(enabled=False)})


def test_shipped_config_takes_mail_with_its_development_account(tmp_path: Path, capfd) -> None:
    cfg = shipped_config(tmp_path)
    assert [s.port for s in load_config(tmp_path / "config.toml").listeners.smtp] == [2525]
    running = start_relais(cfg)
    try:
        printed = capfd.readouterr().err
        user, password = re.search(r"user (\S+) password (\S+)", printed).groups()
        assert (tmp_path / "data" / "tls" / "smtp-dev-cert.pem").exists()
        stored = (tmp_path / "data" / "smtp-dev-account").read_text()
        assert password not in stored and verify_password(password, stored.strip())
        port = running.app.smtp["smtp"].bound_port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=client_tls())
            client.login(user, password)
            assert client.sendmail("dr.martin@hopital.mssante.fr", ["secretariat@relais.localhost"],
                                   Mail(xdm=xdm_zip()).bytes()) == {}  # fmt: skip
    finally:
        running.stop()
    # Second start: same certificate and account, the password is not printed again.
    cert = (tmp_path / "data" / "tls" / "smtp-dev-cert.pem").read_bytes()
    running = start_relais(cfg)
    try:
        assert password not in capfd.readouterr().err
        assert (tmp_path / "data" / "tls" / "smtp-dev-cert.pem").read_bytes() == cert
        with smtplib.SMTP("127.0.0.1", running.app.smtp["smtp"].bound_port, timeout=30) as client:
            client.starttls(context=client_tls())
            client.login(user, password)
    finally:
        running.stop()


def test_hash_password_command_makes_a_hash_the_listener_accepts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "hash-password"],
        input="s3cret passphrase\n", capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
    )  # fmt: skip
    hashed = out.stdout.strip()
    assert hashed.startswith("scrypt$") and verify_password("s3cret passphrase", hashed)
    assert not verify_password("other", hashed)


def test_config_errors_name_the_smtp_key(tmp_path: Path) -> None:
    import pytest

    from engine.config import ConfigError

    path = tmp_path / "config.toml"
    path.write_text('[[listeners.smtp]]\nname = "a"\n[[listeners.smtp]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"listeners: listener names must be unique"):
        load_config(path)
    path.write_text('[[listeners.smtp]]\naccounts = [{ user = "u", password_hash = "plaintext" }]\n')
    with pytest.raises(ConfigError, match=r"listeners\.smtp\[0\]\.accounts\[0\]\.password_hash"):
        load_config(path)
