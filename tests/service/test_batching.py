"""The forward lane: one forward pass at a time on its own thread, merging the submissions
that queued meanwhile, answers back on each caller's event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from service.runtime.batching import ForwardLane


class _Model:
    """A forward pass (blocking, on the lane's thread) that records its inputs and can be
    held open."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.gate = threading.Event()
        self.running = 0
        self.most_running = 0
        self.threads: set[str] = set()

    def run(self, items: list[int]) -> list[int]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.threads.add(threading.current_thread().name)
        self.runs.append(list(items))
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        self.running -= 1
        if -1 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]


async def _until(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``check()`` holds: the lane's thread runs on its own time."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the lane did not get there in time"
        await asyncio.sleep(0.005)


def test_batches_that_wait_are_merged_into_one_forward() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=8)
        first = asyncio.create_task(lane.submit([1]))
        await _until(lambda: model.runs)
        # arrive while [1] runs: four small batches
        later = [asyncio.create_task(lane.submit([i, i + 100])) for i in (2, 3, 4, 5)]
        await asyncio.sleep(0.05)
        model.gate.set()
        assert await first == [10]
        assert [await t for t in later] == [[i * 10, (i + 100) * 10] for i in (2, 3, 4, 5)]
        assert model.runs == [[1], [2, 102, 3, 103, 4, 104, 5, 105]]
        assert model.most_running == 1
        assert model.threads == {"refit-forward"}  # never the event loop's thread
        lane.close()

    asyncio.run(scenario())


def test_merging_stops_at_max_items_and_keeps_batches_whole() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=4)
        held = asyncio.create_task(lane.submit([0]))
        await _until(lambda: model.runs)
        tasks = [asyncio.create_task(lane.submit(b)) for b in ([1], [2, 3], [4, 5], [6], [7])]
        await asyncio.sleep(0.05)
        model.gate.set()
        assert await held == [0]
        results = await asyncio.gather(*tasks)
        assert results == [[10], [20, 30], [40, 50], [60], [70]]
        # all five queued while [0] ran: [1]+[2,3] (adding [4,5] would pass 4 items),
        # then [4,5]+[6]+[7]
        assert model.runs == [[0], [1, 2, 3], [4, 5, 6, 7]]
        # a batch larger than max_items still runs, alone (Serve caps its batches anyway)
        assert await lane.submit([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
        lane.close()

    asyncio.run(scenario())


def test_a_failing_forward_fails_only_its_own_callers() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=2)
        bad = asyncio.create_task(lane.submit([-1]))
        await _until(lambda: model.runs)
        good = asyncio.create_task(lane.submit([2, 3]))
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(ValueError, match="bad item"):
            await bad
        assert await good == [20, 30]
        assert model.runs == [[-1], [2, 3]]
        lane.close()

    asyncio.run(scenario())


def test_a_cancelled_caller_is_skipped_and_the_lane_goes_on() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=8)
        first = asyncio.create_task(lane.submit([1]))
        await _until(lambda: model.runs)
        gone = asyncio.create_task(lane.submit([2]))
        kept = asyncio.create_task(lane.submit([3]))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        model.gate.set()
        assert await first == [10]
        assert await kept == [30]
        assert model.runs == [[1], [3]]
        with pytest.raises(asyncio.CancelledError):
            await gone
        lane.close()

    asyncio.run(scenario())


def test_results_must_match_items() -> None:
    def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        lane = ForwardLane(short, max_items=4)
        with pytest.raises(RuntimeError, match="2 results for 3 items"):
            await lane.submit([1, 2, 3])

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        ForwardLane(short, max_items=0)


def test_a_closed_lane_refuses_new_work_and_its_thread_ends() -> None:
    async def scenario() -> ForwardLane[int, int]:
        model = _Model()
        model.gate.set()
        lane = ForwardLane(model.run, max_items=4)
        assert await lane.submit([1]) == [10]
        lane.close()
        with pytest.raises(RuntimeError, match="closed"):
            await lane.submit([2])
        return lane

    lane = asyncio.run(scenario())
    assert lane._thread is not None
    assert not lane._thread.is_alive()


def test_callers_on_several_event_loops_get_their_own_answers() -> None:
    """Serve's replica and a test may call from different loops: each answer is settled on
    the loop of the caller that asked."""
    model = _Model()
    model.gate.set()
    lane = ForwardLane(model.run, max_items=8)
    got: dict[int, list[int]] = {}

    def caller(i: int) -> None:
        got[i] = asyncio.run(lane.submit([i]))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got == {i: [i * 10] for i in range(1, 5)}
    lane.close()
