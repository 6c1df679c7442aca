"""The request pipeline, outermost first: the call's deadline, access log + metrics, error mapping,
authentication and the role check, admission (load shedding, by admission class), and the guard for requests
that do not decode; on client streams, the idle timeout.

:class:`RequestPipeline` composes them once per method, when the method is registered, into one handler
that serves unary and streaming RPCs alike. The state of one call (caller, final code) lives in a context
variable: gRPC's asyncio server runs every RPC in its own task, so servicers read it without plumbing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from grpc import aio

from posguard_server.api.access import CONTRACT_MODULES, allowed_roles, is_public
from posguard_server.api.auth import Authenticator, Metadata, Principal
from posguard_server.api.errors import status_for
from posguard_server.api.metrics import Metrics
from posguard_server.domain.api_keys import Role
from posguard_server.domain.deadlines import enter_deadline, leave_deadline
from posguard_server.domain.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from posguard_server.logs import AccessLines

log = logging.getLogger(__name__)
access_log = logging.getLogger("posguard_server.access")


def _access_fields(args: tuple[Any, ...]) -> dict[str, object]:
    """An access line's JSON fields, from the arguments of its message (:data:`_access_lines`)."""
    method, code, latency_ms, caller, peer, customer, model_version = args
    return {
        "method": method,
        "code": code,
        "latency_ms": round(latency_ms, 3),
        "caller": caller,
        "peer": peer,
        "customer": customer,
        "model_version": model_version,
    }


# The JSON formatter writes the fields as keys of their own; the text one, the message.
_access_lines = AccessLines(access_log, "%s %s %.2fms caller=%s peer=%s customer=%s model=%s", _access_fields)

_SHED_LOG_SECONDS = 10.0


@dataclass(slots=True, eq=False)
class _Stream:
    """A client stream being served: the admission its requests are worked under, and its idle clock.

    The clock runs while the stream waits for its next request and none of its requests is being worked on;
    when it reaches ``idle_seconds`` (None: never), the wait ends the stream (see ``_checked_items``).
    """

    admission: Admission
    idle_seconds: float | None
    busy: int = 0  # blocks of :func:`stream_work` in progress
    timer: asyncio.Timeout | None = None  # the wait for the next request, while one is waited for

    def stop_idle_clock(self) -> None:
        if self.timer is not None and not self.timer.expired():
            self.timer.reschedule(None)

    def start_idle_clock(self) -> None:
        if self.timer is not None and not self.timer.expired() and not self.busy and self.idle_seconds:
            self.timer.reschedule(asyncio.get_running_loop().time() + self.idle_seconds)


@dataclass(slots=True)
class CallState:
    method: str
    principal: Principal | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    customer: str = ""  # masked number or customer id, for the access log
    model_version: str = ""  # the model that decided, for the access log
    stream: _Stream | None = None  # a client stream's admission and idle clock
    admitted: bool = False  # holds an admission slot for the whole call
    refused: bool = False  # refused at capacity: no access-log line (see Admission)


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
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = aio.ServicerContext[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]


def _streaming_kinds() -> dict[str, tuple[bool, bool]]:
    """``/package.Service/Method`` → (client streams, server streams), for every RPC of the contract."""
    kinds = {}
    for module in CONTRACT_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                kinds[f"/{service.full_name}/{rpc.name}"] = (rpc.client_streaming, rpc.server_streaming)
    return kinds


GATEWAY_CALLS = "gateway"
ADMIN_CALLS = "admin"


def admission_class(method: str) -> str:
    """The admission class of an RPC of the contract: what the gateway role may call is the gateway's work
    (scoring, verification, codes, customer look-ups), the rest is administration (keys, models, the audit
    log, listing customers, lifecycle changes). One definition: the role matrix decides."""
    return GATEWAY_CALLS if Role.GATEWAY in allowed_roles(method) else ADMIN_CALLS


@dataclass(slots=True)
class _Slots:
    """One admission class: at most ``limit`` units of work of its calls in progress."""

    name: str
    limit: int
    in_progress: int = 0

    @property
    def full(self) -> bool:
        return self.in_progress >= self.limit

    def taken(self) -> float:
        return self.in_progress


class Admission:
    """Sheds load: at most so many units of work of each admission class are in progress at once.

    A unary call is one unit from its admission to its answer; a stream (ScoreTransactions) holds one only
    while it has requests being worked on (:func:`stream_work`), so an idle stream holds nothing. Each
    class has its own limit (``limits``, by the names of :func:`admission_class`), so administrative
    listings cannot take the gateways' share, nor the reverse; calls are admitted only once authenticated,
    so callers without a valid key never hold one (authentication bounds its own database reads, see
    ``auth``).

    The next call is refused at once with RESOURCE_EXHAUSTED (reason ``OVERLOADED``), so the calls admitted
    keep their latency instead of every call queueing past its deadline. A refusal must cost next to
    nothing, or refusing becomes the overload: a unary call arriving while its class is full is refused
    before the rest of the pipeline runs, with a status built once, no request decoding and no access-log
    line (the ``posguard_rpc_shed`` metric counts them, and a warning at most every ``_SHED_LOG_SECONDS``
    sums them up). Health checks and reflection are always admitted: a load balancer must see the truth. One
    event loop serves every call, so the counters need no lock.
    """

    def __init__(self, limits: Mapping[str, int], metrics: Metrics) -> None:
        if any(limit < 1 for limit in limits.values()):
            raise ValueError("every limit must be at least 1")
        self._metrics = metrics
        classes = {name: _Slots(name, limit) for name, limit in limits.items()}
        self._slots = {method: classes[admission_class(method)] for method in _streaming_kinds()}
        for name, slots in classes.items():
            # Read when scraped: the count is kept anyway, and a gauge moved twice a call costs two locks.
            metrics.in_progress.labels(name).set_function(slots.taken)
        self._shed_since_log = 0
        self._shed_logged_at = 0.0
        self.refusal_status = status_for(
            ResourceExhausted("the server is at capacity; retry after a short backoff", reason="OVERLOADED"),
            "",
        )

    def counts(self, method: str) -> bool:
        """Whether calls of ``method`` are admitted at all (health and reflection are not)."""
        return method in self._slots

    def slots(self, method: str) -> _Slots:
        """The slots of ``method``'s admission class, for a method's pipeline to check without a look-up."""
        return self._slots[method]

    def refuses(self, method: str, slots: _Slots) -> bool:
        """Whether a unary request of ``method`` arriving now is refused at once (and counted as shed)."""
        if not slots.full:
            return False
        self._shed(method, slots)
        return True

    def try_enter(self, method: str) -> bool:
        """Take a slot of ``method``'s class, or count a refusal and return False.

        Calls let through together by :meth:`refuses` reach here after their requests arrive and their
        caller is authenticated; the count is exact only now, so a burst that got past the cheap check is
        refused here.
        """
        slots = self._slots[method]
        if slots.full:
            self._shed(method, slots)
            return False
        slots.in_progress += 1
        return True

    def leave(self, method: str) -> None:
        self._slots[method].in_progress -= 1

    def _shed(self, method: str, slots: _Slots) -> None:
        self._metrics.shed.labels(method).inc()
        self._shed_since_log += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= _SHED_LOG_SECONDS:
            log.warning(
                "overloaded: refused %d calls since the last report (the latest: %s, beyond %d %s calls)",
                self._shed_since_log,
                method,
                slots.limit,
                slots.name,
            )
            self._shed_since_log, self._shed_logged_at = 0, now


@contextmanager
def stream_work() -> Iterator[None]:
    """Hold an admission slot of the streaming call being served while the block works on its requests.

    Raises ResourceExhausted (reason ``OVERLOADED``) when the call's class has none free: the stream ends,
    what it answered before stays answered, and the caller resends the rest after a short backoff. Outside a
    call, or for a method not admitted, it holds nothing.
    """
    state = _call.get(None)
    if state is None or state.stream is None:
        yield
        return
    stream, method = state.stream, state.method
    if not stream.admission.try_enter(method):
        raise ResourceExhausted("the server is at capacity; retry after a short backoff", reason="OVERLOADED")
    stream.busy += 1
    stream.stop_idle_clock()
    try:
        yield
    finally:
        stream.busy -= 1
        stream.admission.leave(method)
        stream.start_idle_clock()


class RequestPipeline:
    """posguard's request pipeline: everything a call passes before and after its servicer.

    Outermost first: the cheap refusal of a call whose admission class is full, the call's deadline, the
    access log and metrics, error mapping, authentication and the role check, admission, and the guard for
    requests that do not decode (on client streams, with the idle timeout: ``stream_idle_seconds``).

    It is not a gRPC interceptor: each method's pipeline is composed once, when its handler is registered on
    the server that :meth:`serve` returns, with its metric children, roles and access-log name bound, and
    gRPC finds the composed handler in that server's table of methods (:class:`PipelinedServer`). A call
    pays no interceptor hop (a coroutine, a handler look-up and a call-details object) and no closures;
    ``bench/pipeline_bench.py`` could not tell the two apart in CPU per call, but there is less to go wrong.
    A refusal at capacity happens where the request would be decoded (``_MethodPipeline.decoder``), so a
    refused request is never decoded.
    """

    def __init__(
        self,
        admission: Admission,
        metrics: Metrics,
        authenticator: Authenticator,
        *,
        stream_idle_seconds: float | None = None,
    ) -> None:
        self._admission = admission
        self._metrics = metrics
        self._authenticator = authenticator
        self._stream_idle_seconds = stream_idle_seconds or None  # 0: streams are never ended for idling

    def serve(self, server: aio.Server) -> PipelinedServer:
        """``server``, with every service registered on it from now on served through the pipeline."""
        return PipelinedServer(server, self)

    def compose(self, method: str, handler: Handler) -> Handler:
        """``handler`` of ``method`` with the whole pipeline around it."""
        pipeline = _MethodPipeline(
            method, handler, self._admission, self._metrics, self._authenticator, self._stream_idle_seconds
        )
        return pipeline.handler()


class PipelinedServer(aio.Server):
    """A gRPC asyncio server that registers each method's handler composed with the request pipeline.

    The generated ``add_*_to_server`` functions (and reflection's) register a service twice: as registered
    methods and as a generic handler (asked in turn). Registered methods go into one table of our own,
    asked first, instead of gRPC's: for every call, gRPC's asyncio server waits on one pending request per
    registered method (``asyncio.wait`` over all of them), so each registered method costs every call of
    every method. With posguard's 40-odd methods that cost each call 30 to 60 µs of CPU; measured on the echo
    server, 40 registered methods more cost it 13% of its throughput, and a table asked as a generic
    handler costs nothing measurable. Both ways go through the pipeline. Everything else is the wrapped
    server's.
    """

    def __init__(self, server: aio.Server, pipeline: RequestPipeline) -> None:
        self._server = server
        self._pipeline = pipeline
        self._table = _MethodTable()
        self._server.add_generic_rpc_handlers((self._table,))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self._table.methods[method] = self._pipeline.compose(method, handler)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[_Generic]) -> None:
        self._server.add_generic_rpc_handlers(
            [_ComposedGeneric(handler, self._pipeline) for handler in generic_rpc_handlers]
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The registered methods' composed handlers, by full method name (``/package.Service/Method``)."""

    def __init__(self) -> None:
        self.methods: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self.methods.get(handler_call_details.method)


class _ComposedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose methods are composed the first time each is asked for.

    Only methods the handler serves are kept: an unknown name is the caller's choice and stays unanswered,
    so gRPC answers UNIMPLEMENTED.
    """

    def __init__(self, inner: _Generic, pipeline: RequestPipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline
        self._composed: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        composed = self._composed.get(method)
        if composed is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            composed = self._composed[method] = self._pipeline.compose(method, handler)
        return composed


# A call being served: its state, the token that set it, when it started, and the token that set its deadline.
_Call = tuple[CallState, Token[CallState], float, Token[float | None] | None]


class _MethodPipeline:
    """The pipeline of one method, composed once: see :class:`RequestPipeline`."""

    def __init__(
        self,
        method: str,
        handler: Handler,
        admission: Admission,
        metrics: Metrics,
        authenticator: Authenticator,
        stream_idle_seconds: float | None,
    ) -> None:
        self._method = method
        self._handler = handler
        self._admission = admission if admission.counts(method) else None  # health, reflection: not counted
        self._stream_idle_seconds = stream_idle_seconds
        self._authenticator = authenticator
        self._roles = None if is_public(method) else allowed_roles(method)
        self._denied = f"the caller's role may not call {method.rsplit('/', 1)[-1]}"
        self._metrics = metrics
        self._observers: dict[grpc.StatusCode, tuple[str, Callable[[float], None]]] = {}  # code name, tally
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        assert inner is not None  # a handler has exactly one of the four
        self._inner: Callable[..., Any] = inner
        # The servicers' methods are coroutine functions; the generated base servicers (RPCs not implemented
        # yet) are plain functions, whose result is awaited only if it can be.
        self._inner_is_coroutine = inspect.iscoroutinefunction(inner)
        self._client_streams = bool(handler.request_streaming)

    def handler(self) -> Handler:
        """The method's handler with the whole pipeline around it, and the lenient request decoder."""
        decoder = self.decoder()
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

    def decoder(self) -> Callable[[bytes], Any] | None:
        """The request decoder: lenient (:func:`_lenient`), and for a unary request, the cheap refusal.

        A unary request arriving while its admission class is full is not decoded: it becomes ``_REFUSED``,
        which the handler answers at once with the refusal built once (no authentication, no access-log
        line; the ``posguard_rpc_shed`` metric counts it). A client stream is let in: it takes a slot per
        request worked on, not for being open.
        """
        strict = self._handler.request_deserializer
        lenient = _lenient(strict)
        admission, method = self._admission, self._method
        if admission is None or self._client_streams:
            return lenient
        slots = admission.slots(method)
        if strict is None:
            return lambda data: _REFUSED if admission.refuses(method, slots) else data

        def decoder(data: bytes) -> Any:  # one call per request: this is _lenient with the refusal before it
            if admission.refuses(method, slots):
                return _REFUSED
            try:
                return strict(data)
            except Exception:
                return _UNDECODABLE

        return decoder

    async def _refuse(self, context: Context) -> NoReturn:
        assert self._admission is not None  # only counted methods refuse
        refusal = self._admission.refusal_status
        await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)
        raise AssertionError("abort returned")  # it raises AbortError

    async def _unary(self, request: Any, context: Context) -> Any:
        if request is _REFUSED:
            await self._refuse(context)
        call = self._begin(context)
        state = call[0]
        try:
            # Each step awaits only when it must: a coroutine per step would cost more than the step.
            if self._roles is not None and not self._known(state, context):
                await self._authenticate(state, context)
            if not self._admit(state):
                await self._refuse(context)
            if request is _UNDECODABLE:
                raise _undecodable_request()
            if self._inner_is_coroutine:
                return await self._inner(request, context)
            result = self._inner(request, context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as error:
            await self._fail(error, state, context)
            raise
        finally:
            self._end(call, context)

    async def _streaming(self, request: Any, context: Context) -> AsyncIterator[Any]:
        if request is _REFUSED:
            await self._refuse(context)
        call = self._begin(context)
        state = call[0]
        try:
            if self._roles is not None and not self._known(state, context):
                await self._authenticate(state, context)
            if self._client_streams:
                # Not admitted as a whole: its servicer takes a slot per request worked on (stream_work).
                requests = _checked_items(request, state.stream)
            elif not self._admit(state):
                await self._refuse(context)
            else:
                requests = _checked(request)
            async for item in self._inner(requests, context):
                yield item
        except BaseException as error:
            await self._fail(error, state, context)
            raise
        finally:
            self._end(call, context)

    def _begin(self, context: Context) -> _Call:
        """Set the call's deadline and its state."""
        deadline = None
        state = CallState(self._method)
        if self._admission is not None:  # health, reflection: not counted, no deadline handed on
            deadline = enter_deadline(context.time_remaining())
            if self._client_streams:
                state.stream = _Stream(self._admission, self._stream_idle_seconds)
        return state, _call.set(state), time.perf_counter(), deadline

    def _known(self, state: CallState, context: Context) -> bool:
        """Whether the caller presents a key verified here lately (``Authenticator.verified``); the role
        matrix applied. False: :meth:`_authenticate` checks the key."""
        principal = self._authenticator.verified(cast(Metadata, context.invocation_metadata() or ()))
        if principal is None:
            return False
        self._allow(state, principal)
        return True

    async def _authenticate(self, state: CallState, context: Context) -> None:
        """Check the caller's key with the key store (its first call here, or a stale or bad key)."""
        metadata = cast(Metadata, context.invocation_metadata() or ())  # a tuple of (key, value) at run time
        self._allow(state, await self._authenticator.authenticate(metadata))

    def _allow(self, state: CallState, principal: Principal) -> None:
        """Apply the role matrix to the authenticated caller."""
        assert self._roles is not None  # public methods are not authenticated
        state.principal = principal
        if self._roles.isdisjoint(principal.roles):
            raise PermissionDenied(self._denied, reason="ROLE_NOT_ALLOWED")

    def _admit(self, state: CallState) -> bool:
        """Take an admission slot for the authenticated call; False when its class is full (the call is then
        refused, with no access-log line). Methods not counted are always admitted."""
        if self._admission is None:
            return True
        if not self._admission.try_enter(self._method):
            state.refused = True
            return False
        state.admitted = True
        return True

    def _end(self, call: _Call, context: Context) -> None:
        state, token, started, deadline = call
        _call.reset(token)
        if not state.refused:
            self._finish(state, context, time.perf_counter() - started)
        if deadline is not None:
            leave_deadline(deadline)
        if state.admitted and self._admission is not None:
            self._admission.leave(self._method)

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
            code = state.code.name
            tally = self._metrics.rpc_tally(self._method, code)
            observer = self._observers[state.code] = (code, tally.observe)
        code, observe = observer
        observe(elapsed)
        if not access_log.isEnabledFor(logging.INFO):
            return
        caller = state.principal.key_id if state.principal else "-"
        customer, model = state.customer or "-", state.model_version or "-"
        _access_lines.write((self._method, code, elapsed * 1e3, caller, context.peer(), customer, model))


def _failed(state: CallState, context: Context) -> None:
    """The code of a call that ended in an exception no status was made of (cancelled, or a crash)."""
    if context.cancelled():
        state.code = grpc.StatusCode.CANCELLED
    elif state.code == grpc.StatusCode.OK:
        state.code = grpc.StatusCode.UNKNOWN


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


_UNDECODABLE = _Undecodable()


class _Refused:
    """Stands in for a request refused at capacity before it was decoded."""


_REFUSED = _Refused()


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


async def _checked_items(requests: AsyncIterator[Any], stream: _Stream | None) -> AsyncIterator[Any]:
    """The requests of a client stream, checked; ends the stream when it idles (see :class:`_Stream`)."""
    if stream is None or stream.idle_seconds is None:
        async for request in requests:
            yield _checked(request)
        return
    iterator = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(None) as timer:
                stream.timer = timer
                stream.start_idle_clock()
                request = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not timer.expired():
                raise
            raise DeadlineExceeded(
                f"no request on this stream for {stream.idle_seconds:g} s: the server ended it; "
                "open a new stream to send more",
                reason="STREAM_IDLE",
            ) from None
        finally:
            stream.timer = None
        yield _checked(request)
