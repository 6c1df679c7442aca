"""Group commit: concurrent calls share database transactions, each caller answered after its commit.

Every score must be durable before it is answered, and on SQLite a durable commit is a sync to disk that
only one writer at a time may do. Alone, a call gets a batch of one and waits for nothing. Under load, the
calls that arrive while a batch is committing form the next batch, so one sync serves many callers.

The batches run on long-lived writer threads fed by a queue, not on a thread borrowed per batch: the event
loop only enqueues and never blocks, a writer picks up whatever has queued when it is free, and one
callback per batch hands the answers back to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from posguard_server.domain.deadlines import current_deadline, latest_deadline

log = logging.getLogger(__name__)
# How often AfterTheAnswer logs the items it lost, at most.
_LOST_LOG_SECONDS = 60.0

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
_T = TypeVar("_T")
_Answer = tuple[asyncio.Future[_Result], _Result | Exception]


@dataclass(frozen=True, slots=True)
class _Entry(Generic[_Item, _Result]):
    lane: GroupCommit[_Item, _Result]
    item: _Item
    deadline: float | None
    future: asyncio.Future[_Result]
    loop: asyncio.AbstractEventLoop


class Writers:
    """Long-lived writer threads of one database, shared by every ``GroupCommit`` writing to it.

    On SQLite only one transaction writes at a time, so the gateway RPCs' group commits (scores,
    verifications, redemptions) share its one writer instead of each taking a thread that waits for the
    lock. On PostgreSQL one writer is the default too: calls that arrive during a batch form the next,
    larger one, where more writers would split them and compete for the interpreter lock. A writer takes
    the oldest waiting call's kind and runs a batch of that kind; the other kinds wait their turn.
    The threads start with the first call; ``close`` stops them once what is queued has run.
    """

    def __init__(self, workers: int = 1, *, name: str = "posguard-writer") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._workers = workers
        self._name = name
        # Lists of entries, one per turn of the event loop and kind; None tells a writer to stop.
        self._queue: queue.SimpleQueue[list[_Entry[Any, Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._closed = False

    def put(self, entries: list[_Entry[Any, Any]]) -> None:
        self._queue.put(entries)

    def start(self) -> None:
        """Start the threads (idempotent); RuntimeError once closed."""
        if self._threads and not self._closed:
            return
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the writer is closed")
            if self._threads:
                return
            for n in range(self._workers):
                thread = threading.Thread(target=self._write, name=f"{self._name}-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        """Stop the writers after what is queued has run; calls after this are refused. Idempotent."""
        with self._start_lock:
            already, self._closed = self._closed, True
            threads = list(self._threads)
        if already:
            for thread in threads:
                thread.join()
            return
        # What the event loop has not handed over yet belongs to calls the server has already cut off.
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _write(self) -> None:
        waiting: list[_Entry[Any, Any]] = []
        stop = False
        while waiting or not stop:
            if not waiting:
                arrived = self._queue.get()
                if arrived is None:
                    return
                waiting = arrived
            lane = waiting[0].lane
            # Whatever else has queued joins, up to the limit; the rest waits for the next batch.
            while sum(entry.lane is lane for entry in waiting) < lane.limit and not stop:
                try:
                    arrived = self._queue.get_nowait()
                except queue.Empty:
                    break
                if arrived is None:
                    stop = True
                else:
                    waiting.extend(arrived)
            batch: list[_Entry[Any, Any]] = []
            rest: list[_Entry[Any, Any]] = []
            for entry in waiting:
                (batch if entry.lane is lane and len(batch) < lane.limit else rest).append(entry)
            waiting = rest
            # A caller that gave up while queued is dropped before anything is written. (Its future is read
            # from this thread: at worst a caller leaving right now is stored, as if its answer was lost.)
            batch = [entry for entry in batch if not entry.future.done()]
            if batch:
                lane.run(batch)


class GroupCommit(Generic[_Item, _Result]):
    """Runs ``run_batch`` (blocking) on writer threads over the items of concurrent callers.

    ``run_batch`` returns one result or exception per item, in order; an exception it raises is every
    item's. Batches hold at most ``limit`` items; as many run at once as there are writer threads: its own
    ``workers`` threads, or the shared ``writers``. A caller that gives up (its deadline passed) while its
    item waits takes the item out. A batch runs under the latest deadline of its callers
    (``domain.deadlines``): it rolls back, writing nothing, only when every one of them has given up.
    Otherwise an item whose caller left while its batch ran is stored whole, exactly as a call whose answer
    was lost on the way back, and a retry replays it. ``close`` stops the writers (shared ones too) once the
    queue is drained.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[_Item]], Sequence[_Result | Exception]],
        *,
        limit: int,
        workers: int = 1,
        writers: Writers | None = None,
        name: str = "posguard-writer",
    ) -> None:
        if limit < 1:
            raise ValueError("limit and workers must be at least 1")
        self._run_batch = run_batch
        self.limit = limit
        self._writers = writers if writers is not None else Writers(workers, name=name)
        self._arriving: list[_Entry[_Item, _Result]] = []

    async def submit(
        self, item: _Item, *, detached: bool = False, then: Callable[[_Result], object] | None = None
    ) -> _Result:
        """The result for ``item``, once its batch has committed; its exception if it was refused.

        ``detached``: the item is written whatever its caller does meanwhile, neither under the caller's
        deadline nor taken out when the caller leaves. For what must be written even for a caller that gives
        up on the answer: a guess's count (see ``api.enumeration``). ``then`` is called with the result, on
        the event loop, whether or not the caller still waits for it (not for an exception).
        """
        future = self._enqueue([item], detached=detached)[0]
        if then is not None:
            future.add_done_callback(functools.partial(_then, then))
        if detached:
            # A caller cancelled here leaves the future, and so its item, to the writer.
            return await asyncio.shield(future)
        # A caller cancelled while waiting cancels its future; the writer then skips or drops it.
        return await future

    async def submit_many(self, items: Sequence[_Item]) -> list[_Result | Exception]:
        """``submit`` for several items at once (a stream's batch), in order; errors are returned."""
        futures = self._enqueue(items)
        try:
            await asyncio.wait(futures)
        finally:
            for future in futures:
                future.cancel()  # no-op for the answered; the rest are dropped by the writer
        results: list[_Result | Exception] = []
        for future in futures:
            outcome = _outcome(future)
            results.append(outcome)
        return results

    def close(self) -> None:
        """Stop the writers after what is queued has run; calls after this are refused."""
        self._writers.close()

    def _enqueue(self, items: Sequence[_Item], *, detached: bool = False) -> list[asyncio.Future[_Result]]:
        """Futures of ``items``, handed to the writers once this turn of the loop is done.

        ``detached``: the items do not run under the current call's deadline (their caller is answered
        before they are written, see ``AfterTheAnswer``, or they must be written even if it leaves).
        """
        self._writers.start()
        loop = asyncio.get_running_loop()
        deadline = None if detached else current_deadline()
        futures = [loop.create_future() for _ in items]
        if not self._arriving:
            # Handed over once this turn of the loop is done: the calls that arrive together go together.
            loop.call_soon(self._flush)
        self._arriving.extend(_Entry(self, i, deadline, f, loop) for i, f in zip(items, futures, strict=True))
        return futures

    def _flush(self) -> None:
        arriving, self._arriving = self._arriving, []
        # In batch-sized pieces, so that every writer can take one.
        for start in range(0, len(arriving), self.limit):
            self._writers.put(arriving[start : start + self.limit])

    def run(self, batch: list[_Entry[_Item, _Result]]) -> None:
        """Run one batch (on a writer thread) and hand each caller its answer on its event loop."""
        results: Sequence[_Result | Exception]
        try:
            with latest_deadline([entry.deadline for entry in batch]):
                results = self._run_batch([entry.item for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except Exception as error:
            results = [error] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Answer[_Result]]] = {}
        for entry, result in zip(batch, results, strict=True):
            by_loop.setdefault(entry.loop, []).append((entry.future, result))
        for loop, answers in by_loop.items():
            # A loop that has closed (RuntimeError) has nobody waiting for these answers any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, answers)


class AfterTheAnswer(Generic[_Item]):
    """Items written after their callers were answered, in batches on the database's writer threads.

    For writes an answer need not wait for (a successful verification's counters). Items are held on the
    loop for up to ``linger`` seconds, or until ``limit`` have come, so that they reach the writer in full
    batches instead of one commit each. At most ``backlog`` items are held or written at a time, and those
    are what a crash can lose: a caller that would exceed the backlog waits for its own item's commit
    instead, so a writer that falls behind slows callers down rather than letting the loss grow. A batch that
    fails loses its items: they are counted in a log line, at most one a minute. ``flush`` (at shutdown,
    before the writers close) writes what is held and waits for all of it.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[_Item]], object],
        *,
        limit: int,
        writers: Writers,
        backlog: int,
        linger: float,
        what: str,
    ) -> None:
        if limit < 1 or backlog < 0 or linger < 0:
            raise ValueError("limit must be at least 1, backlog and linger at least 0")
        self._run_batch = run_batch
        # A released batch is one item of the lane: one future and one callback a batch, not one an item.
        self._lane: GroupCommit[list[_Item], None] = GroupCommit(self._write, limit=1, writers=writers)
        self._limit = limit
        self._backlog = backlog
        self._linger = linger
        self._what = what  # what the items are, for the log line of a batch that failed
        self._held: list[_Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Future[None]] = set()  # batches handed to the writers, not written yet
        self._unwritten = 0  # the items of those batches
        self._losses = threading.Lock()  # batches fail on the writer threads
        self._lost = 0  # items lost since the last log line
        self._logged_at = -float("inf")

    @property
    def waiting(self) -> int:
        """Items posted and not written yet (held, queued or being written)."""
        return len(self._held) + self._unwritten

    async def post(self, item: _Item) -> None:
        """Queue ``item``; returns at once, or once it is written when the backlog is full."""
        self._held.append(item)
        if self.waiting > self._backlog:
            mine = self._release()
            assert mine is not None  # ``item`` was held
            await asyncio.wait([mine])  # not ``await mine``: a caller cancelled must not cancel the batch
        elif len(self._held) >= self._limit:
            self._release()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._release)

    async def flush(self) -> None:
        """Hand over what is held and wait until everything posted is written (or lost)."""
        self._release()
        if self._writing:
            await asyncio.wait(list(self._writing))

    def _release(self) -> asyncio.Future[None] | None:
        """Hand what is held to the writers as one batch; its future (None when nothing was held)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        if not held:
            return None
        future = self._lane._enqueue([held], detached=True)[0]
        self._writing.add(future)
        self._unwritten += len(held)
        future.add_done_callback(functools.partial(self._written, len(held)))
        return future

    def _written(self, count: int, future: asyncio.Future[None]) -> None:
        self._writing.discard(future)
        self._unwritten -= count

    def _write(self, batches: Sequence[list[_Item]]) -> list[None]:
        """Run on a writer thread: a failure is logged here, not handed to callers long answered."""
        items = [item for batch in batches for item in batch]
        try:
            self._run_batch(items)
        except Exception as error:
            with self._losses:
                self._lost += len(items)
                now = time.monotonic()
                # A database that refuses writes fails every batch (one each ``linger``): a line a minute.
                if now - self._logged_at >= _LOST_LOG_SECONDS:
                    # Its class only: a driver's message can hold stored values.
                    log.warning("%d %s were not stored: %s", self._lost, self._what, type(error).__name__)
                    self._logged_at, self._lost = now, 0
        return [None] * len(batches)


def _deliver(answers: list[_Answer[_Result]]) -> None:
    for future, result in answers:
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


def _then(then: Callable[[_T], object], future: asyncio.Future[_T]) -> None:
    if not future.cancelled() and future.exception() is None:
        then(future.result())


def _outcome(future: asyncio.Future[_T]) -> _T | Exception:
    if future.cancelled():
        # Only the caller cancels a future, and then it never reads the outcome.
        return RuntimeError("the call was cancelled")
    error = future.exception()
    if error is not None:
        return error if isinstance(error, Exception) else RuntimeError(str(error))
    return future.result()
