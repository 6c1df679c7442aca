"""Calls that arrive in one turn of the event loop, served together on the loop itself.

For work too short to be worth a thread hop (SQLite's indexed reads, ``store.verifications.LocalReads``):
each call waits on a future, and the batch runs once the loop has taken in what is ready, so concurrent calls
share one statement instead of each paying its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class LoopBatch(Generic[_Item, _Result]):
    """Runs ``run_batch`` (quick, non-blocking) on the event loop over the items of one turn of it.

    ``run_batch`` returns one result per item, in order; an exception it raises is every item's.
    """

    def __init__(self, run_batch: Callable[[Sequence[_Item]], Sequence[_Result]]) -> None:
        self._run_batch = run_batch
        self._arriving: list[tuple[_Item, asyncio.Future[_Result]]] = []

    async def submit(self, item: _Item) -> _Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        if not self._arriving:
            loop.call_soon(self._run)
        self._arriving.append((item, future))
        return await future

    def _run(self) -> None:
        arriving, self._arriving = self._arriving, []
        try:
            results = self._run_batch([item for item, _ in arriving])
            if len(results) != len(arriving):
                raise RuntimeError(f"a batch of {len(arriving)} items gave {len(results)} results")
        except Exception as error:
            for _, future in arriving:
                if not future.done():  # a caller that left cancelled its future
                    future.set_exception(error)
            return
        for (_, future), result in zip(arriving, results, strict=True):
            if not future.done():
                future.set_result(result)
