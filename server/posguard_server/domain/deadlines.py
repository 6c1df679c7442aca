"""The deadline of the call being served, readable from any code the call runs (threads included).

The API layer sets it from the client's gRPC deadline; the store checks it when a unit of work begins and
again just before it commits, so work whose caller has given up stops and rolls back instead of writing
an answer nobody will read. A context variable carries it: ``asyncio.to_thread`` copies the caller's
context into the worker thread, so the store sees the deadline without any plumbing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

from posguard_server.domain.errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("posguard_deadline", default=None)


def enter_deadline(seconds: float | None) -> Token[float | None]:
    """From now on the current call must be done ``seconds`` from now (None: no deadline); undone by
    :func:`leave_deadline` with what this returns. The request pipeline sets every call's deadline this way:
    a generator-based context manager costs several microseconds more per call."""
    return _deadline.set(None if seconds is None else time.monotonic() + seconds)


def leave_deadline(token: Token[float | None]) -> None:
    """The deadline as it was before the :func:`enter_deadline` that returned ``token``."""
    _deadline.reset(token)


@contextmanager
def deadline_after(seconds: float | None) -> Iterator[None]:
    """Within the block, the current call must be done ``seconds`` from now (None: no deadline)."""
    token = enter_deadline(seconds)
    try:
        yield
    finally:
        leave_deadline(token)


@contextmanager
def latest_deadline(deadlines: list[float | None]) -> Iterator[None]:
    """Work done for several callers at once runs until the last of them gives up (None: never)."""
    known = [d for d in deadlines if d is not None]
    token = _deadline.set(None if not known or len(known) < len(deadlines) else max(known))
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """The ``time.monotonic()`` value by which the current call must be done, or None."""
    return _deadline.get()


def check_deadline() -> None:
    """Raise ``DeadlineExceeded`` when the current call's deadline has passed."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(
            "the call's deadline passed before its work was done", reason="DEADLINE_EXCEEDED"
        )
