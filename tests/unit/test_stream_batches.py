"""Batching a request stream: order kept, batches are what has arrived, equal keys never share a batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from posguard_server.api.stream_batches import StreamBatches


async def _items(values: list[str], *, fail: bool = False) -> AsyncIterator[str]:
    for value in values:
        yield value
    if fail:
        raise ConnectionError("the stream broke")


async def _all(batches: StreamBatches[str]) -> list[list[str]]:
    out = []
    while batch := await batches.next():
        out.append(batch)
    return out


def test_what_has_arrived_is_one_batch_in_order() -> None:
    async def run() -> list[list[str]]:
        async with StreamBatches(_items(list("abcdefg")), limit=3, key=str) as batches:
            await asyncio.sleep(0.01)  # let the reader queue everything it may
            return await _all(batches)

    assert asyncio.run(run()) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]


def test_a_slow_sender_gets_batches_of_one() -> None:
    async def slow() -> AsyncIterator[str]:
        for value in "xyz":
            await asyncio.sleep(0.01)
            yield value

    async def run() -> list[list[str]]:
        async with StreamBatches(slow(), limit=8, key=str) as batches:
            return await _all(batches)

    assert asyncio.run(run()) == [["x"], ["y"], ["z"]]


def test_an_equal_key_starts_a_new_batch() -> None:
    async def run() -> list[list[str]]:
        async with StreamBatches(_items(["a1", "b1", "a2", "c1"]), limit=10, key=lambda v: v[0]) as batches:
            await asyncio.sleep(0.01)
            return await _all(batches)

    assert asyncio.run(run()) == [["a1", "b1"], ["a2", "c1"]]


def test_a_broken_stream_raises_after_what_came_before() -> None:
    async def run() -> list[list[str]]:
        got: list[list[str]] = []
        async with StreamBatches(_items(["a", "b"], fail=True), limit=1, key=str) as batches:
            await asyncio.sleep(0.01)
            got.append(await batches.next())
            got.append(await batches.next())
            with pytest.raises(ConnectionError):
                await batches.next()
            with pytest.raises(ConnectionError):  # and keeps saying so
                await batches.next()
        return got

    assert asyncio.run(run()) == [["a"], ["b"]]


def test_leaving_early_stops_the_reader() -> None:
    async def endless() -> AsyncIterator[int]:
        n = 0
        while True:
            yield n
            n += 1

    async def run() -> tuple[list[int], bool]:
        async with StreamBatches(endless(), limit=4, key=str) as batches:
            first = await batches.next()
            reader = batches._reader
        assert reader is not None
        return first, reader.done()

    first, stopped = asyncio.run(run())
    assert first[0] == 0
    assert stopped


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        StreamBatches(_items([]), limit=0, key=str)
