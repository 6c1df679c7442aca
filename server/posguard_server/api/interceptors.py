"""Server interceptors, outermost first: admission (load shedding and the call's deadline), access log +
metrics, error mapping, authentication, and the guard for requests that do not decode.

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

from posguard.v1 import admin_pb2, customer_ids_pb2, risk_pb2
from posguard_server.api.access import allowed_roles, is_public
from posguard_server.api.auth import Authenticator, Principal
from posguard_server.api.errors import status_for
from posguard_server.api.metrics import Metrics
from posguard_server.domain.deadlines import deadline_after
from posguard_server.domain.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("posguard_server.access")

_SHED_LOG_SECONDS = 10.0


@dataclass(slots=True)
class CallState:
    method: str
    principal: Principal | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    customer: str = ""  # masked number or customer id, for the access log
    model_version: str = ""  # the model that decided, for the access log


_call: ContextVar[CallState] = ContextVar("posguard_call")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by :class:`AuthInterceptor`)."""
    principal = _call.get().principal
    if principal is None:  # only public methods run without one, and they never ask
        raise Unauthenticated("this call is not authenticated", reason="UNAUTHENTICATED")
    return principal


def annotate_call(*, customer: str = "", model_version: str = "") -> None:
    """Name the (masked) customer and the model of the call being served in its access-log line."""
    state = _call.get(None)
    if state is None:  # outside a call (the stream scores many; only the call's own line is kept)
        return
    if customer:
        state.customer = customer
    if model_version:
        state.model_version = model_version


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
            fields = {
                "method": method,
                "code": code,
                "latency_ms": round(elapsed * 1e3, 3),
                "caller": caller,
                "peer": context.peer(),
                "customer": state.customer or "-",
                "model_version": state.model_version or "-",
            }
            # The JSON formatter writes ``fields`` as keys of their own; the text one, this message.
            access_log.info(
                "%s %s %.2fms caller=%s peer=%s customer=%s model=%s",
                method,
                code,
                elapsed * 1e3,
                caller,
                fields["peer"],
                fields["customer"],
                fields["model_version"],
                extra={"fields": fields},
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


def _streaming_kinds() -> dict[str, tuple[bool, bool]]:
    """``/package.Service/Method`` → (client streams, server streams), for every RPC of the contract."""
    kinds = {}
    for module in (customer_ids_pb2, risk_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                kinds[f"/{service.full_name}/{rpc.name}"] = (rpc.client_streaming, rpc.server_streaming)
    return kinds


class AdmissionInterceptor(_ScopedInterceptor):
    """The outermost interceptor: sheds load, and hands the client's deadline to the work the call does.

    At most ``limit`` calls are in progress; the next one is refused at once with RESOURCE_EXHAUSTED
    (reason ``OVERLOADED``), so the calls admitted keep their latency instead of every call queueing past
    its deadline. A refusal must cost next to nothing, or refusing becomes the overload: it happens before
    any other interceptor runs, with a status built once, no request decoding and no access-log line (the
    ``posguard_rpc_shed`` metric counts them, and a warning at most every ``_SHED_LOG_SECONDS`` sums them
    up). Health checks and reflection are always admitted: a load balancer must see the truth. One event
    loop serves every call, so the counter needs no lock.
    """

    def __init__(self, limit: int, metrics: Metrics) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._metrics = metrics
        self._in_progress = 0
        self._kinds = _streaming_kinds()
        self._shed_since_log = 0
        self._shed_logged_at = 0.0
        refusal = status_for(
            ResourceExhausted("the server is at capacity; retry after a short backoff", reason="OVERLOADED"),
            "",
        )

        async def refuse(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)

        self._refuse = refuse

        async def refuse_streaming(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            nothing: list[Any] = []
            for item in nothing:  # makes this an async generator, as gRPC expects of a streaming handler
                yield item
            await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)

        # Raw bytes in (no deserializer): a refused request is never decoded.
        self._refusals: dict[tuple[bool, bool], grpc.RpcMethodHandler[Any, Any]] = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse_streaming),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse_streaming),
        }

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        kind = self._kinds.get(method)
        if kind is not None and self._in_progress >= self._limit:
            self._shed(method)
            return self._refusals[kind]
        return await super().intercept_service(continuation, handler_call_details)

    def _shed(self, method: str) -> None:
        self._metrics.shed.labels(method).inc()
        self._shed_since_log += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= _SHED_LOG_SECONDS:
            log.warning(
                "overloaded: refused %d calls beyond %d in progress since the last report",
                self._shed_since_log,
                self._limit,
            )
            self._shed_since_log, self._shed_logged_at = 0, now

    @asynccontextmanager
    async def scope(
        self, method: str, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if method not in self._kinds:  # health, reflection: admitted, not counted
            yield
            return
        if self._in_progress >= self._limit:
            # Calls admitted together in intercept_service reach here after their requests arrive; the
            # count is exact only now, so a burst that got past the cheap check is refused here.
            self._shed(method)
            await self._refuse(None, context)
        self._in_progress += 1
        self._metrics.in_progress.inc()
        try:
            with deadline_after(context.time_remaining()):
                yield
        finally:
            self._in_progress -= 1
            self._metrics.in_progress.dec()


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


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


_UNDECODABLE = _Undecodable()


def _undecodable_request() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request", "is not a valid protobuf message of this method's request type")],
        reason="MALFORMED_REQUEST",
    )


class DecodeInterceptor(_Interceptor):
    """Answers INVALID_ARGUMENT for request bytes that do not parse (gRPC itself would answer INTERNAL).

    It must be the innermost interceptor: the lenient decoder replaces the method's own, and the check runs
    after authentication, so an unauthenticated caller learns nothing from sending garbage. A stream item
    that does not parse ends the stream with the same error, raised where the servicer reads it.

    The registered handler of a method never changes, so its guarded version is built once per method, not
    on every call.
    """

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is not None:
            return guarded
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # type: ignore[return-value]
        guarded = self._guarded[method] = _guard_decoding(handler)
        return guarded


def _guard_decoding(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with a decoder that marks bad bytes and a check that refuses what it marked."""
    strict = handler.request_deserializer
    assert strict is not None

    def lenient(data: bytes) -> Any:
        try:
            return strict(data)
        except Exception:  # protobuf's DecodeError, or an invalid UTF-8 string field
            return _UNDECODABLE

    def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
        def checked(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if request is _UNDECODABLE:
                raise _undecodable_request()
            return inner(request, context)

        return checked

    def streaming(inner: Callable[..., Any]) -> Callable[..., Any]:
        async def items(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                if request is _UNDECODABLE:
                    raise _undecodable_request()
                yield request

        def checked(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
            return inner(items(requests), context)

        return checked

    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), request_deserializer=lenient, response_serializer=serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            unary(handler.unary_stream), request_deserializer=lenient, response_serializer=serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            streaming(handler.stream_unary), request_deserializer=lenient, response_serializer=serializer
        )
    assert handler.stream_stream is not None  # a handler has exactly one of the four
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream), request_deserializer=lenient, response_serializer=serializer
    )
