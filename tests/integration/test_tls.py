"""TLS and mutual TLS end to end, with a CA and certificates generated for the test."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import posguard

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .conftest import RunningServer


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("posguard test CA", None)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    issuer = (ca_cert.subject, ca_key)
    server_cert, server_key = _write(
        directory, "server", *_issue("localhost", issuer, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    )
    client_cert, client_key = _write(
        directory, "client", *_issue("till-7", issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    # A client certificate from a CA the server does not trust.
    other_ca = _issue("someone else's CA", None)
    stranger_cert, stranger_key = _write(
        directory,
        "stranger",
        *_issue("stranger", (other_ca[0].subject, other_ca[1]), usage=ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)


def test_tls_serves_clients_that_trust_the_ca(server_factory: Callable[..., RunningServer], pki: Pki) -> None:
    running = server_factory(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    token = running.key("admin")
    tls = posguard.TLS(ca_file=pki.ca, server_name="localhost")
    with posguard.Client(running.target, api_key=token, tls=tls) as client:
        assert [k.name for k in client.list_api_keys().keys] == ["test admin"]
    # Plaintext to a TLS port fails to connect: nothing is served in the clear.
    with (
        posguard.Client(running.target, api_key=token, timeout=2) as plain,
        pytest.raises(posguard.UnavailableError),
    ):
        plain.list_api_keys()


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(
    server_factory: Callable[..., RunningServer], pki: Pki
) -> None:
    running = server_factory(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    )
    token = running.key("admin")
    good = posguard.TLS(
        ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key, server_name="localhost"
    )
    with posguard.Client(running.target, api_key=token, tls=good) as client:
        assert len(client.list_api_keys().keys) == 1
    for tls in (
        posguard.TLS(ca_file=pki.ca, server_name="localhost"),
        posguard.TLS(
            ca_file=pki.ca, cert_file=pki.stranger_cert, key_file=pki.stranger_key, server_name="localhost"
        ),
    ):
        client = posguard.Client(running.target, api_key=token, tls=tls, timeout=2)
        with client, pytest.raises(posguard.UnavailableError):
            client.list_api_keys()
