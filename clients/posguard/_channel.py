"""What the sync and asyncio clients share: TLS settings, retry policy, request preparation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from posguard.v1 import admin_pb2, cases_pb2, customer_ids_pb2, policy_pb2, risk_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0

M = TypeVar("M", bound=Message)
C = TypeVar("C")

# Calls that must not be retried by the channel: a key's token exists only in the first answer, and a
# stream cannot be replayed message for message.
_NOT_RETRIED = (("posguard.v1.Admin", "CreateApiKey"), ("posguard.v1.Risk", "ScoreTransactions"))


def service_config() -> str:
    """Retry UNAVAILABLE with backoff. Every other unary RPC is idempotent: reads by nature, writes because
    the client fills ``request_id`` once per call, so a resent request is recognised as the same one."""
    retry = {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    services = [
        service.full_name
        for module in (customer_ids_pb2, risk_pb2, admin_pb2, cases_pb2, policy_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    ]
    return json.dumps(
        {
            "methodConfig": [
                {"name": [{"service": s} for s in services], "retryPolicy": retry},
                {"name": [{"service": s, "method": m} for s, m in _NOT_RETRIED]},
            ]
        }
    )


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS to the server. ``ca_file`` None trusts the system roots; ``cert_file`` + ``key_file`` add a
    client certificate for mutual TLS; ``server_name`` overrides the name checked in the server's cert."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(root certificates, private key, certificate chain) as grpc.ssl_channel_credentials takes them."""

        def load(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return load(self.ca_file), load(self.key_file), load(self.cert_file)


def channel_options(tls: TLS | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def normalize_tls(tls: TLS | bool | None) -> TLS | None:
    if tls is True:
        return TLS()
    return tls or None


def open_channel(
    target: str, tls: TLS | bool | None, *, insecure: Callable[..., C], secure: Callable[..., C]
) -> C:
    """A channel with posguard's retry policy, plaintext or TLS; ``insecure``/``secure`` pick sync or aio."""
    tls_config = normalize_tls(tls)
    options = channel_options(tls_config)
    if tls_config is None:
        return insecure(target, options=options)
    return secure(target, grpc.ssl_channel_credentials(*tls_config.read()), options=options)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def build_request(request_type: type[M], request: M | None, fields: dict[str, Any]) -> M:
    """The request to send: the message given, or one built from keyword fields; ``request_id`` filled.

    A request_id made here is generated once per call, so transparent retries of that call reuse it.
    """
    if request is not None and fields:
        raise TypeError("pass either a request message or keyword fields, not both")
    if request is None:
        request = request_type(**fields)
    elif not isinstance(request, request_type):
        raise TypeError(f"expected {request_type.__name__}, got {type(request).__name__}")
    if "request_id" in request.DESCRIPTOR.fields_by_name and not cast("Any", request).request_id:
        filled = request_type()
        cast("Any", filled).request_id = uuid.uuid4().hex
        filled.MergeFrom(request)  # proto3 merge keeps the filled id: the request's own is empty
        return filled
    return request
