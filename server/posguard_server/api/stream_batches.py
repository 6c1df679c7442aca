"""Group a request stream into batches of what has already arrived, for one database commit per batch.

A gateway streaming transactions sends faster than one commit per transaction can keep up with. While a batch
is being scored, the next requests arrive and wait in a bounded queue; the next batch is all of them (up to
a limit), so under load each commit carries many transactions and with a slow sender each batch is one
request and nothing waits. The bounded queue keeps gRPC's flow control holding a fast sender back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Generic, TypeVar

_Request = TypeVar("_Request")


class _End:
    """The sender finished (or its stream failed)."""


_END = _End()


class StreamBatches(Generic[_Request]):
    """Batches of requests in the order sent; ``key`` requests are never batched together when equal.

    Two requests with the same key (a retried transaction id) go to different batches, so the second sees
    what the first stored, exactly as it would one request at a time. Use as an async context manager: the
    reader task stops when the block ends.
    """

    def __init__(
        self, requests: AsyncIterator[_Request], *, limit: int, key: Callable[[_Request], Hashable]
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._requests = requests
        self._limit = limit
        self._key = key
        self._queue: asyncio.Queue[_Request | _End] = asyncio.Queue(limit)
        self._held: _Request | _End | None = None
        self._error: Exception | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StreamBatches[_Request]:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                await self._queue.put(request)
        except Exception as error:  # the stream broke: the consumer raises it after what came before
            self._error = error
        await self._queue.put(_END)

    async def next(self) -> list[_Request]:
        """The next batch: waits for one request, then takes what is queued; [] once the sender is done."""
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        if isinstance(first, _End):
            self._held = first  # stays finished
            if self._error is not None:
                raise self._error
            return []
        batch = [first]
        keys = {self._key(first)}
        while len(batch) < self._limit and not self._queue.empty():
            request = self._queue.get_nowait()
            if isinstance(request, _End) or self._key(request) in keys:
                self._held = request
                break
            batch.append(request)
            keys.add(self._key(request))
        return batch
