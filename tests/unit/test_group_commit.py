"""Group commit: concurrent callers share batches, and each gets its own result or error."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from posguard_server.api.group_commit import AfterTheAnswer, GroupCommit, Writers


class Recorder:
    """A batch runner that takes a while, records its batches, and fails items named "bad"."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[str]) -> list[str | Exception]:
        with self._lock:
            self.batches.append(list(items))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return [ValueError(item) if item == "bad" else item.upper() for item in items]


def test_a_lone_call_is_a_batch_of_one() -> None:
    runner = Recorder(0)

    async def run() -> str:
        return await GroupCommit(runner, limit=8).submit("a")

    assert asyncio.run(run()) == "A"
    assert runner.batches == [["a"]]


def test_calls_arriving_during_a_commit_share_the_next_one() -> None:
    runner = Recorder()

    async def run() -> list[str]:
        commits = GroupCommit(runner, limit=4)
        return list(await asyncio.gather(*(commits.submit(f"x{i}") for i in range(9))))

    assert asyncio.run(run()) == [f"X{i}" for i in range(9)]
    # All nine were queued before the first batch started: batches of the limit, in order.
    assert runner.batches == [["x0", "x1", "x2", "x3"], ["x4", "x5", "x6", "x7"], ["x8"]]


def test_each_caller_gets_its_own_error() -> None:
    runner = Recorder(0)

    async def run() -> list[str | BaseException]:
        commits = GroupCommit(runner, limit=8)
        return list(
            await asyncio.gather(*(commits.submit(v) for v in ("a", "bad", "c")), return_exceptions=True)
        )

    a, bad, c = asyncio.run(run())
    assert (a, c) == ("A", "C")
    assert isinstance(bad, ValueError)


def test_a_failed_batch_fails_every_caller_in_it() -> None:
    def broken(items: Sequence[str]) -> list[str | Exception]:
        raise ConnectionError("database down")

    async def run() -> list[str | BaseException]:
        commits = GroupCommit(broken, limit=8)
        return list(await asyncio.gather(*(commits.submit(v) for v in "ab"), return_exceptions=True))

    assert all(isinstance(r, ConnectionError) for r in asyncio.run(run()))


def test_a_runner_that_miscounts_fails_its_callers_instead_of_hanging_them() -> None:
    async def run() -> BaseException | None:
        commits = GroupCommit(lambda items: [], limit=8)
        try:
            await asyncio.wait_for(commits.submit("a"), 5)
        except RuntimeError as error:
            return error
        return None

    assert isinstance(asyncio.run(run()), RuntimeError)


@pytest.mark.parametrize(
    ("detached", "batches"),
    # Given up while it waited: never ran; detached (a guess's count), it runs all the same.
    [(False, [["a"], ["c"]]), (True, [["a"], ["b", "c"]])],
)
def test_a_caller_that_gives_up_does_not_disturb_the_others(detached: bool, batches: list[list[str]]) -> None:
    runner = Recorder()

    async def run() -> list[str]:
        commits = GroupCommit(runner, limit=8)
        first = asyncio.create_task(commits.submit("a"))
        while not runner.batches:  # the first batch starts with "a" alone
            await asyncio.sleep(0.001)
        impatient = asyncio.create_task(commits.submit("b", detached=detached))
        patient = asyncio.create_task(commits.submit("c"))
        await asyncio.sleep(0)
        impatient.cancel()
        return [await first, await patient]

    assert asyncio.run(run()) == ["A", "C"]
    assert runner.batches == batches


def test_then_takes_each_result_even_when_its_caller_has_left() -> None:
    runner = Recorder()
    seen: list[str] = []

    async def run() -> list[str | BaseException]:
        commits = GroupCommit(runner, limit=8)
        leaving = asyncio.create_task(commits.submit("a", detached=True, then=seen.append))
        await asyncio.sleep(0)
        leaving.cancel()
        failed = await asyncio.gather(commits.submit("bad", then=seen.append), return_exceptions=True)
        await commits.submit("c", then=seen.append)
        return list(failed)

    [failed] = asyncio.run(run())
    assert isinstance(failed, ValueError)
    assert seen == ["A", "C"]  # not called for an exception


def test_a_caller_that_gives_up_during_its_commit_is_still_stored() -> None:
    runner = Recorder()

    async def run() -> str:
        commits = GroupCommit(runner, limit=8)
        impatient = asyncio.create_task(commits.submit("a"))
        await asyncio.sleep(0.01)  # its batch is running
        impatient.cancel()
        return await commits.submit("b")

    assert asyncio.run(run()) == "B"
    assert runner.batches == [["a"], ["b"]]


def test_workers_bound_the_batches_in_flight() -> None:
    runner = Recorder()

    async def run() -> None:
        commits = GroupCommit(runner, limit=1, workers=2)
        await asyncio.gather(*(commits.submit(str(i)) for i in range(6)))

    asyncio.run(run())
    assert runner.most_at_once == 2
    assert sorted(item for batch in runner.batches for item in batch) == [str(i) for i in range(6)]


def test_a_call_right_after_a_worker_finished_still_runs() -> None:
    runner = Recorder(0)

    async def run() -> list[str]:
        commits = GroupCommit(runner, limit=8)
        first = await commits.submit("a")
        # The worker has returned, but its done-callbacks (if any) have not run yet: no loop turn in between,
        # so submit here directly (wait_for would start it a turn later) and time out by cancelling.
        this = asyncio.current_task()
        assert this is not None
        timeout = asyncio.get_running_loop().call_later(5, this.cancel)
        second = await commits.submit("b")
        timeout.cancel()
        return [first, second]

    assert asyncio.run(run()) == ["A", "B"]


@pytest.mark.parametrize(("limit", "workers"), [(0, 1), (1, 0)])
def test_limits_must_be_positive(limit: int, workers: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(Recorder(), limit=limit, workers=workers)


def test_submit_many_returns_each_items_result_or_error_in_order() -> None:
    runner = Recorder(0)

    async def run() -> list[str | Exception]:
        return await GroupCommit(runner, limit=2).submit_many(["a", "bad", "c"])

    a, bad, c = asyncio.run(run())
    assert (a, c) == ("A", "C")
    assert isinstance(bad, ValueError)
    assert runner.batches == [["a", "bad"], ["c"]]


def test_one_long_lived_writer_runs_every_batch_and_close_stops_it() -> None:
    runner = Recorder(0)
    threads: set[threading.Thread] = set()

    def run_batch(items: Sequence[str]) -> list[str | Exception]:
        threads.add(threading.current_thread())
        return runner(items)

    commits = GroupCommit(run_batch, limit=4)

    async def run() -> None:
        for i in range(5):
            await commits.submit(str(i))

    asyncio.run(run())
    assert len(runner.batches) == 5
    (writer,) = threads
    assert writer.name == "posguard-writer-0"
    commits.close()
    assert not writer.is_alive()

    async def after() -> None:
        await commits.submit("late")

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(after())


# -- writes after the answer ---------------------------------------------------------------------------


class Gate:
    """A batch runner that records its batches and holds each until the test opens the gate."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.open = threading.Event()
        self.fail = fail

    def __call__(self, items: Sequence[str]) -> list[None]:
        self.open.wait(10)
        self.batches.append(list(items))
        if self.fail:
            raise RuntimeError("the database said no")
        return [None] * len(items)


def test_posted_items_are_held_briefly_and_written_in_one_batch() -> None:
    gate = Gate()
    gate.open.set()

    async def run() -> int:
        later = AfterTheAnswer(gate, limit=64, writers=Writers(), backlog=100, linger=0.05, what="items")
        for i in range(10):
            await later.post(f"x{i}")  # each returns at once
        assert gate.batches == []  # held for the linger, not one commit each
        await asyncio.sleep(0.3)
        return later.waiting

    assert asyncio.run(run()) == 0
    assert gate.batches == [[f"x{i}" for i in range(10)]]


def test_a_full_batch_goes_without_waiting_for_the_linger() -> None:
    gate = Gate()
    gate.open.set()

    async def run() -> None:
        later = AfterTheAnswer(gate, limit=4, writers=Writers(), backlog=100, linger=60, what="items")
        for i in range(8):
            await later.post(f"x{i}")
        await later.flush()

    asyncio.run(run())
    assert gate.batches == [["x0", "x1", "x2", "x3"], ["x4", "x5", "x6", "x7"]]


def test_past_the_backlog_a_caller_waits_for_its_own_write() -> None:
    gate = Gate()

    async def run() -> tuple[int, bool, int]:
        later = AfterTheAnswer(gate, limit=2, writers=Writers(), backlog=3, linger=0, what="items")
        for i in range(3):
            await later.post(f"x{i}")  # within the backlog: at once, though nothing is written yet
        held = later.waiting
        fourth = asyncio.create_task(later.post("x3"))
        await asyncio.sleep(0.2)
        waited = not fourth.done()  # the writer is stuck: the fourth caller waits
        gate.open.set()
        await fourth
        await later.flush()
        return held, waited, later.waiting

    held, waited, left = asyncio.run(run())
    assert held == 3
    assert waited
    assert left == 0
    assert sorted(item for batch in gate.batches for item in batch) == ["x0", "x1", "x2", "x3"]


def test_flush_writes_what_is_held_and_waits_for_it() -> None:
    gate = Gate()
    gate.open.set()

    async def run() -> None:
        later = AfterTheAnswer(gate, limit=64, writers=Writers(), backlog=100, linger=60, what="items")
        await later.post("a")
        await later.post("b")
        await later.flush()
        assert later.waiting == 0

    asyncio.run(run())
    assert gate.batches == [["a", "b"]]


def test_a_failed_write_after_the_answer_is_logged_at_most_once_a_minute_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = Gate(fail=True)
    gate.open.set()

    async def run() -> None:
        later = AfterTheAnswer(gate, limit=64, writers=Writers(), backlog=100, linger=0, what="counters")
        for i in range(5):
            await later.post(f"x{i}")
        await later.flush()

    with caplog.at_level("WARNING", logger="posguard_server.api.group_commit"):
        asyncio.run(run())
    # One line for the five lost (at most one a minute), naming the error's class, not its message.
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["5 counters were not stored: RuntimeError"]
