"""The blocking posguard client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc

from posguard import errors
from posguard._channel import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TLS,
    M,
    auth_metadata,
    build_request,
    open_channel,
)
from posguard.v1.rpc_methods import SyncRpcs


class Client(SyncRpcs):
    """Talks to a posguard server; one method per RPC (``client.issue_customer_id(holder=...)``).

    Every call carries a deadline (``timeout`` seconds, per client or per call), the API key as
    ``authorization: Bearer`` metadata, and a ``request_id`` filled in when the request has none. Errors are
    raised as :class:`posguard.errors.PosguardError` subclasses. Pass ``channel`` to use a channel you built
    (its retry policy and credentials are then yours).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TLS | bool = False,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        self._metadata = auth_metadata(api_key)
        self._owns_channel = channel is None
        self.channel = channel or open_channel(
            target, tls, insecure=grpc.insecure_channel, secure=grpc.secure_channel
        )
        self._callables: dict[str, Any] = {}

    def _unary(
        self,
        method: str,
        request_type: type[M],
        response_type: type[Any],
        request: M | None,
        fields: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        message = build_request(request_type, request, fields)
        call = self._callables.get(method)
        if call is None:
            call = self.channel.unary_unary(
                method,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            self._callables[method] = call
        try:
            return call(message, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def _stream(
        self,
        method: str,
        request_type: type[M],
        response_type: type[Any],
        requests: Iterable[M],
        timeout: float | None,
    ) -> Iterator[Any]:
        call = self.channel.stream_stream(
            method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        # A stream's deadline covers the whole stream: pass timeout for long-running streams.
        responses = call(
            (build_request(request_type, r, {}) for r in requests),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )
        try:
            yield from responses
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
