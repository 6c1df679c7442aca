"""TLS and mutual TLS end to end, with a CA and certificates generated for the test (``pki`` in conftest)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import posguard

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import Pki, RunningServer


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
