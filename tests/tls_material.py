"""Certificates made by the tests: a CA, a server certificate for 127.0.0.1, client certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool, usage=None, san=None):
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("Relais test CA", ca_key, None, ca_key, ca=True)
    other_key = _key()
    other_ca = _cert("Some other CA", other_key, None, other_key, ca=True)
    paths = {}
    for label, subject, issuer, issuer_key, usage, san in (
        ("server", "relais.test", ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
        ("client", "SIH_CHU", ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH, None),
        ("stranger", "INTRUS", other_ca, other_key, ExtendedKeyUsageOID.CLIENT_AUTH, None),
    ):  # fmt: skip
        key = _key()
        cert = _cert(subject, key, issuer.subject, issuer_key, ca=False, usage=usage, san=san)
        (folder / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[label] = (folder / f"{label}.pem", _write_key(key, folder / f"{label}.key"))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=folder / "ca.pem",
        server_cert=paths["server"][0], server_key=paths["server"][1],
        client_cert=paths["client"][0], client_key=paths["client"][1],
        stranger_cert=paths["stranger"][0], stranger_key=paths["stranger"][1],
    )  # fmt: skip
