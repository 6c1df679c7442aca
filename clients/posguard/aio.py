"""The asyncio posguard client: the same methods as :class:`posguard.Client`, as coroutines."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any

from grpc import aio

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
from posguard.v1.rpc_methods import AsyncRpcs

__all__ = ["TLS", "Client"]


class Client(AsyncRpcs):
    """Async twin of :class:`posguard.Client`; use ``async with posguard.aio.Client(...) as client``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TLS | bool = False,
        channel: aio.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        self._metadata = auth_metadata(api_key)
        self._owns_channel = channel is None
        self.channel = channel or open_channel(
            target, tls, insecure=aio.insecure_channel, secure=aio.secure_channel
        )
        self._callables: dict[str, Any] = {}

    async def _unary(
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
            return await call(message, timeout=timeout or self.timeout, metadata=self._metadata)
        except aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None

    async def _stream(
        self,
        method: str,
        request_type: type[M],
        response_type: type[Any],
        requests: AsyncIterable[M] | Iterable[M],
        timeout: float | None,
    ) -> AsyncIterator[Any]:
        async def prepared() -> AsyncIterator[M]:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    yield build_request(request_type, request, {})
            else:
                for request in requests:
                    yield build_request(request_type, request, {})

        call = self.channel.stream_stream(
            method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        responses = call(prepared(), timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for response in responses:
                yield response
        except aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close(grace=None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
