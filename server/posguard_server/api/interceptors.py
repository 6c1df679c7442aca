"""Server interceptors, outermost first: access log + metrics, error mapping, authentication.

Each interceptor contributes an async context manager (its *scope*) wrapped around the handler, so the same
code serves unary and streaming RPCs. The state of one call (caller, final code) lives in a context
variable: gRPC's asyncio server runs every RPC in its own task, so servicers read it without plumbing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from posguard_server.api.access import allowed_roles, is_public
from posguard_server.api.auth import Authenticator, Principal
from posguard_server.api.errors import status_for
from posguard_server.api.metrics import Metrics
from posguard_server.domain.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)
access_log = logging.getLogger("posguard_server.access")


@dataclass(slots=True)
class CallState:
    method: str
    principal: Principal | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK


_call: ContextVar[CallState] = ContextVar("posguard_call")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by :class:`AuthInterceptor`)."""
    principal = _call.get().principal
    if principal is None:  # only public methods run without one, and they never ask
        raise Unauthenticated("this call is not authenticated", reason="UNAUTHENTICATED")
    return principal


Scope = Callable[[aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], scope: Scope) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with ``scope`` entered around every call of it."""

    async def unary_response(request: Any, context: aio.ServicerContext[Any, Any], inner: Any) -> Any:
        async with scope(context):
            result = inner(request, context)
            # The generated base servicers (RPCs not implemented yet) are plain functions.
            return await result if inspect.isawaitable(result) else result

    async def stream_response(
        request: Any, context: aio.ServicerContext[Any, Any], inner: Any
    ) -> AsyncIterator[Any]:
        async with scope(context):
            async for item in inner(request, context):
                yield item

    def bind(fn: Callable[..., Any], inner: Any) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):

            async def bound_stream(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async for item in fn(request, context, inner):
                    yield item

            return bound_stream

        async def bound(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            return await fn(request, context, inner)

        return bound

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            bind(unary_response, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            bind(unary_response, handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            bind(stream_response, handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        bind(stream_response, handler.stream_stream),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


if TYPE_CHECKING:
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = aio.ServerInterceptor


class _ScopedInterceptor(_Interceptor):
    def scope(
        self, method: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself (the stubs omit the None)
            return handler  # type: ignore[return-value]
        method: str = handler_call_details.method
        return _wrap(handler, lambda context: self.scope(method, handler_call_details, context))


class AccessLogInterceptor(_ScopedInterceptor):
    """Times every call, counts it in the metrics and writes one access-log line."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @asynccontextmanager
    async def scope(
        self, method: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        state = CallState(method)
        token = _call.set(state)
        started = time.perf_counter()
        try:
            yield
        except aio.AbortError:
            raise  # the error interceptor already recorded the code
        except BaseException:
            if context.cancelled():
                state.code = grpc.StatusCode.CANCELLED
            elif state.code == grpc.StatusCode.OK:
                state.code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            elapsed = time.perf_counter() - started
            _call.reset(token)
            code = state.code.name
            self._metrics.observe(method, code, elapsed)
            caller = state.principal.key_id if state.principal else "-"
            access_log.info(
                "%s %s %.2fms caller=%s peer=%s", method, code, elapsed * 1e3, caller, context.peer()
            )


class ErrorInterceptor(_ScopedInterceptor):
    """Turns every exception into a canonical status with details; nothing internal reaches the client."""

    @asynccontextmanager
    async def scope(
        self, method: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        try:
            yield
        except (aio.AbortError, GeneratorExit):
            raise
        except Exception as error:
            status = status_for(error, method)
            _call.get().code = status.code
            await context.abort(status.code, status.details, status.trailing_metadata)


class AuthInterceptor(_ScopedInterceptor):
    """Authenticates the API key and enforces the role matrix before the handler runs."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    @asynccontextmanager
    async def scope(
        self, method: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if not is_public(method):
            metadata = details.invocation_metadata or ()
            principal = await self._authenticator.authenticate(metadata)
            _call.get().principal = principal
            if not principal.roles & allowed_roles(method):
                raise PermissionDenied(
                    f"the caller's role may not call {method.rsplit('/', 1)[-1]}", reason="ROLE_NOT_ALLOWED"
                )
        yield
