"""The forward lane behind ``@serve.batch``: one forward pass at a time, merging the batches
that queued meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from service.runtime.batching import ForwardLane


class _Model:
    """A forward pass that records its inputs and can be held open."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.gate = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def run(self, items: list[int]) -> list[int]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.runs.append(list(items))
        await self.gate.wait()
        self.running -= 1
        if -1 in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]


def test_batches_that_wait_are_merged_into_one_forward() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=8)
        first = asyncio.create_task(lane.submit([1]))
        await asyncio.sleep(0)
        # arrive while [1] runs: four small batches
        later = [asyncio.create_task(lane.submit([i, i + 100])) for i in (2, 3, 4, 5)]
        await asyncio.sleep(0)
        model.gate.set()
        assert await first == [10]
        assert [await t for t in later] == [[i * 10, (i + 100) * 10] for i in (2, 3, 4, 5)]
        assert model.runs == [[1], [2, 102, 3, 103, 4, 104, 5, 105]]
        assert model.most_running == 1

    asyncio.run(scenario())


def test_merging_stops_at_max_items_and_keeps_batches_whole() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=4)
        tasks = [asyncio.create_task(lane.submit(b)) for b in ([1], [2, 3], [4, 5], [6], [7])]
        await asyncio.sleep(0)
        model.gate.set()
        results = await asyncio.gather(*tasks)
        assert results == [[10], [20, 30], [40, 50], [60], [70]]
        # all five queued before the lane ran: [1]+[2,3] (adding [4,5] would pass 4 items),
        # then [4,5]+[6]+[7]
        assert model.runs == [[1, 2, 3], [4, 5, 6, 7]]
        # a batch larger than max_items still runs, alone (Serve caps its batches anyway)
        assert await lane.submit([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]

    asyncio.run(scenario())


def test_a_failing_forward_fails_only_its_own_callers() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=2)
        bad = asyncio.create_task(lane.submit([-1]))
        await asyncio.sleep(0)
        good = asyncio.create_task(lane.submit([2, 3]))
        await asyncio.sleep(0)
        model.gate.set()
        with pytest.raises(ValueError, match="bad item"):
            await bad
        assert await good == [20, 30]

    asyncio.run(scenario())


def test_a_cancelled_caller_is_skipped_and_the_lane_goes_on() -> None:
    async def scenario() -> None:
        model = _Model()
        lane = ForwardLane(model.run, max_items=8)
        first = asyncio.create_task(lane.submit([1]))
        await asyncio.sleep(0)
        gone = asyncio.create_task(lane.submit([2]))
        kept = asyncio.create_task(lane.submit([3]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        assert await first == [10]
        assert await kept == [30]
        assert model.runs == [[1], [3]]
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())


def test_results_must_match_items() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        lane = ForwardLane(short, max_items=4)
        with pytest.raises(RuntimeError, match="2 results for 3 items"):
            await lane.submit([1, 2, 3])

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        ForwardLane(short, max_items=0)
