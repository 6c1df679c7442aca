"""Group commit: concurrent calls share database transactions, each caller answered after its commit.

Every score must be durable before it is answered, and on SQLite a durable commit is a sync to disk that
only one writer at a time may do. Alone, a call gets a batch of one and waits for nothing. Under load, the
calls that arrive while a batch is committing form the next batch, so one sync serves many callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from posguard_server.domain.deadlines import current_deadline, latest_deadline

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class GroupCommit(Generic[_Item, _Result]):
    """Runs ``run_batch`` (blocking: on a worker thread) over the items of concurrent ``submit`` calls.

    ``run_batch`` returns one result or exception per item, in order; an exception it raises is every
    item's. ``workers`` batches may run at once (1 where the database has one writer). A caller that gives up
    (its deadline passed) while its item waits takes the item out. A batch runs under the latest deadline of
    its callers (``domain.deadlines``): it rolls back, writing nothing, only when every one of them has
    given up. Otherwise an item whose caller left while its batch ran is stored whole, exactly as a call
    whose answer was lost on the way back, and a retry replays it.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[_Item]], Sequence[_Result | Exception]],
        *,
        limit: int,
        workers: int = 1,
    ) -> None:
        if limit < 1 or workers < 1:
            raise ValueError("limit and workers must be at least 1")
        self._run_batch = run_batch
        self._limit = limit
        self._workers = workers
        self._pending: list[tuple[_Item, float | None, asyncio.Future[_Result]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: _Item) -> _Result:
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, current_deadline(), future))
        # Read done() now, not through a done-callback: callbacks run a loop turn late, and a worker that has
        # just finished would still be counted, leaving this item with nobody to run it.
        self._running = {task for task in self._running if not task.done()}
        if len(self._running) < self._workers:
            self._running.add(asyncio.create_task(self._drain()))
        # A caller cancelled while waiting cancels its future; the worker then drops that result.
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._limit]
            del self._pending[: self._limit]
            # A caller that gave up while queued (its deadline passed) is dropped before anything is written.
            batch = [entry for entry in batch if not entry[2].done()]
            if not batch:
                continue
            results: Sequence[_Result | Exception]
            try:
                results = await asyncio.to_thread(
                    self._run, [item for item, _, _ in batch], [deadline for _, deadline, _ in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
            except Exception as error:
                results = [error] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, items: list[_Item], deadlines: list[float | None]) -> Sequence[_Result | Exception]:
        with latest_deadline(deadlines):
            return self._run_batch(items)
