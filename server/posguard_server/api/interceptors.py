"""The request pipeline, outermost first: admission (load shedding and the call's deadline), access log +
metrics, error mapping, authentication and the role check, and the guard for requests that do not decode.

One interceptor, :class:`RequestPipeline`, composes them once per method into one handler that serves unary
and streaming RPCs alike. The state of one call (caller, final code) lives in a context variable: gRPC's
asyncio server runs every RPC in its own task, so servicers read it without plumbing.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from grpc import aio

from posguard.v1 import admin_pb2, customer_ids_pb2, risk_pb2
from posguard_server.api.access import allowed_roles, is_public
from posguard_server.api.auth import Authenticator, Metadata, Principal
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
    """The authenticated caller of the RPC being served (set by :class:`RequestPipeline`)."""
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


if TYPE_CHECKING:
    _Interceptor = aio.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
    Context = aio.ServicerContext[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = aio.ServerInterceptor


def _streaming_kinds() -> dict[str, tuple[bool, bool]]:
    """``/package.Service/Method`` → (client streams, server streams), for every RPC of the contract."""
    kinds = {}
    for module in (customer_ids_pb2, risk_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                kinds[f"/{service.full_name}/{rpc.name}"] = (rpc.client_streaming, rpc.server_streaming)
    return kinds


class Admission:
    """Sheds load: at most ``limit`` calls of the contract are in progress at once.

    The next one is refused at once with RESOURCE_EXHAUSTED (reason ``OVERLOADED``), so the calls admitted
    keep their latency instead of every call queueing past its deadline. A refusal must cost next to
    nothing, or refusing becomes the overload: it happens before the rest of the pipeline runs, with a
    status built once, no request decoding and no access-log line (the ``posguard_rpc_shed`` metric counts
    them, and a warning at most every ``_SHED_LOG_SECONDS`` sums them up). Health checks and reflection are
    always admitted: a load balancer must see the truth. One event loop serves every call, so the counter
    needs no lock.
    """

    def __init__(self, limit: int, metrics: Metrics) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._metrics = metrics
        self._in_progress = 0
        self.kinds = _streaming_kinds()
        self._shed_since_log = 0
        self._shed_logged_at = 0.0
        refusal = status_for(
            ResourceExhausted("the server is at capacity; retry after a short backoff", reason="OVERLOADED"),
            "",
        )

        async def refuse(request: Any, context: Context) -> Any:
            await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)

        self._refuse = refuse

        async def refuse_streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            nothing: list[Any] = []
            for item in nothing:  # makes this an async generator, as gRPC expects of a streaming handler
                yield item
            await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)

        # Raw bytes in (no deserializer): a refused request is never decoded.
        self._refusals: dict[tuple[bool, bool], Handler] = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse_streaming),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse_streaming),
        }

    def refusal(self, method: str) -> Handler | None:
        """The handler that refuses a call of ``method`` arriving at capacity, or None to admit it."""
        if self._in_progress < self._limit:
            return None
        kind = self.kinds.get(method)
        if kind is None:
            return None
        self._shed(method)
        return self._refusals[kind]

    async def enter(self, method: str, context: Context) -> None:
        """Count a call in, or refuse it.

        Calls let through together by :meth:`refusal` reach here after their requests arrive; the count is
        exact only now, so a burst that got past the cheap check is refused here.
        """
        if self._in_progress >= self._limit:
            self._shed(method)
            await self._refuse(None, context)
        self._in_progress += 1
        self._metrics.in_progress.inc()

    def leave(self) -> None:
        self._in_progress -= 1
        self._metrics.in_progress.dec()

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


class RequestPipeline(_Interceptor):
    """posguard's one server interceptor: everything a call passes before and after its servicer.

    Outermost first: admission (load shedding) and the call's deadline, the access log and metrics, error
    mapping, authentication and the role check, and the guard for requests that do not decode. The
    registered handler of a method never changes, so the pipeline of a method is composed once, the first
    time the method is called, with its metric children, its roles and its access-log name bound; a call
    then costs one dictionary lookup here and no closures. It must be the server's only interceptor (it
    answers later calls of a method without asking the ones after it).
    """

    def __init__(self, admission: Admission, metrics: Metrics, authenticator: Authenticator) -> None:
        self._admission = admission
        self._metrics = metrics
        self._authenticator = authenticator
        self._composed: dict[str, Handler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        method: str = handler_call_details.method
        refusal = self._admission.refusal(method)
        if refusal is not None:
            return refusal
        composed = self._composed.get(method)
        if composed is None:
            handler: Handler | None = await continuation(handler_call_details)
            # An unknown method: gRPC answers UNIMPLEMENTED. Not cached: its name is the caller's choice.
            if handler is None:
                return handler  # type: ignore[return-value]
            composed = self._composed[method] = _MethodPipeline(
                method, handler, self._admission, self._metrics, self._authenticator
            ).handler()
        return composed


# A call being served: its state, the token that set it, when it started, and its deadline's scope.
_Call = tuple[CallState, Token[CallState], float, AbstractContextManager[None] | None]


class _MethodPipeline:
    """The pipeline of one method, composed once: see :class:`RequestPipeline`."""

    def __init__(
        self,
        method: str,
        handler: Handler,
        admission: Admission,
        metrics: Metrics,
        authenticator: Authenticator,
    ) -> None:
        self._method = method
        self._handler = handler
        self._admission = admission if method in admission.kinds else None  # health, reflection: not counted
        self._authenticator = authenticator
        self._roles = None if is_public(method) else allowed_roles(method)
        self._denied = f"the caller's role may not call {method.rsplit('/', 1)[-1]}"
        self._metrics = metrics
        self._observers: dict[grpc.StatusCode, tuple[str, Callable[[], None], Callable[[float], None]]] = {}
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        assert inner is not None  # a handler has exactly one of the four
        self._inner: Callable[..., Any] = inner
        self._check: Callable[[Any], Any] = _checked if not handler.request_streaming else _checked_items

    def handler(self) -> Handler:
        """The method's handler with the whole pipeline around it, and the lenient request decoder."""
        decoder = _lenient(self._handler.request_deserializer)
        serializer = self._handler.response_serializer
        if self._handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary, request_deserializer=decoder, response_serializer=serializer
            )
        if self._handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary, request_deserializer=decoder, response_serializer=serializer
            )
        if self._handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming, request_deserializer=decoder, response_serializer=serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming, request_deserializer=decoder, response_serializer=serializer
        )

    async def _unary(self, request: Any, context: Context) -> Any:
        call = await self._begin(context)
        try:
            await self._authorize(call[0], context)
            result = self._inner(self._check(request), context)
            # The generated base servicers (RPCs not implemented yet) are plain functions.
            return await result if inspect.isawaitable(result) else result
        except BaseException as error:
            await self._fail(error, call[0], context)
            raise
        finally:
            self._end(call, context)

    async def _streaming(self, request: Any, context: Context) -> AsyncIterator[Any]:
        call = await self._begin(context)
        try:
            await self._authorize(call[0], context)
            async for item in self._inner(self._check(request), context):
                yield item
        except BaseException as error:
            await self._fail(error, call[0], context)
            raise
        finally:
            self._end(call, context)

    async def _begin(self, context: Context) -> _Call:
        """Admit the call (or refuse it: it then has no access-log line), set its deadline and its state."""
        deadline = None
        if self._admission is not None:  # health, reflection: not counted, no deadline handed on
            await self._admission.enter(self._method, context)
            deadline = deadline_after(context.time_remaining())
            deadline.__enter__()
        state = CallState(self._method)
        return state, _call.set(state), time.perf_counter(), deadline

    def _end(self, call: _Call, context: Context) -> None:
        state, token, started, deadline = call
        _call.reset(token)
        self._finish(state, context, time.perf_counter() - started)
        if deadline is not None:
            deadline.__exit__(None, None, None)
        if self._admission is not None:
            self._admission.leave()

    async def _fail(self, error: BaseException, state: CallState, context: Context) -> None:
        """Record how the call ended; an error becomes a canonical status (the caller re-raises the rest)."""
        if isinstance(error, aio.AbortError):  # a status was sent already
            return
        if not isinstance(error, Exception):  # cancelled, or the stream closed (GeneratorExit)
            _failed(state, context)
            return
        try:
            await self._abort(error, state, context)
        except aio.AbortError:
            raise
        except BaseException:
            _failed(state, context)
            raise

    async def _authorize(self, state: CallState, context: Context) -> None:
        """Authenticate the API key and apply the role matrix (public methods need neither)."""
        if self._roles is None:
            return
        metadata = cast(Metadata, context.invocation_metadata() or ())  # a tuple of (key, value) at run time
        principal = await self._authenticator.authenticate(metadata)
        state.principal = principal
        if self._roles.isdisjoint(principal.roles):
            raise PermissionDenied(self._denied, reason="ROLE_NOT_ALLOWED")

    async def _abort(self, error: Exception, state: CallState, context: Context) -> NoReturn:
        """Turn an exception into a canonical status with details; nothing internal reaches the client."""
        status = status_for(error, self._method)
        state.code = status.code
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returned")  # it raises AbortError

    def _finish(self, state: CallState, context: Context, elapsed: float) -> None:
        """Count the call in the metrics and write its one access-log line."""
        observer = self._observers.get(state.code)
        if observer is None:
            calls, latency = self._metrics.rpc_children(self._method, state.code.name)
            observer = self._observers[state.code] = (state.code.name, calls.inc, latency.observe)
        code, count, observe = observer
        count()
        observe(elapsed)
        if not access_log.isEnabledFor(logging.INFO):
            return
        caller = state.principal.key_id if state.principal else "-"
        fields = {
            "method": self._method,
            "code": code,
            "latency_ms": round(elapsed * 1e3, 3),
            "caller": caller,
            "peer": context.peer(),
            "customer": state.customer or "-",
            "model_version": state.model_version or "-",
        }
        # The JSON formatter writes ``fields`` as keys of their own; the text one, this message. The record is
        # made directly (no search of the stack for the caller) and formatted by the thread that writes it.
        record = access_log.makeRecord(
            access_log.name,
            logging.INFO,
            __file__,
            0,
            "%s %s %.2fms caller=%s peer=%s customer=%s model=%s",
            (
                self._method,
                code,
                elapsed * 1e3,
                caller,
                fields["peer"],
                fields["customer"],
                fields["model_version"],
            ),
            None,
            extra={"fields": fields},
        )
        access_log.handle(record)


def _failed(state: CallState, context: Context) -> None:
    """The code of a call that ended in an exception no status was made of (cancelled, or a crash)."""
    if context.cancelled():
        state.code = grpc.StatusCode.CANCELLED
    elif state.code == grpc.StatusCode.OK:
        state.code = grpc.StatusCode.UNKNOWN


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


_UNDECODABLE = _Undecodable()


def _undecodable_request() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request", "is not a valid protobuf message of this method's request type")],
        reason="MALFORMED_REQUEST",
    )


def _lenient(strict: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A decoder that marks bad bytes instead of failing (gRPC itself would answer INTERNAL).

    The check that refuses what it marked runs after authentication, so an unauthenticated caller learns
    nothing from sending garbage. A stream item that does not parse ends the stream with the same error,
    raised where the servicer reads it.
    """
    if strict is None:
        return None

    def lenient(data: bytes) -> Any:
        try:
            return strict(data)
        except Exception:  # protobuf's DecodeError, or an invalid UTF-8 string field
            return _UNDECODABLE

    return lenient


def _checked(request: Any) -> Any:
    if request is _UNDECODABLE:
        raise _undecodable_request()
    return request


async def _checked_items(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _UNDECODABLE:
            raise _undecodable_request()
        yield request
