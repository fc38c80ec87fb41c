"""One forward pass at a time, fed by every batch that queued while the last one ran.

``@serve.batch`` forms a batch from what arrives within its wait window and hands it to the
batch function at once, whether or not the previous batch has finished (the
``max_concurrent_batches`` semaphore, added by ray-project/ray PR #53096, is taken *after*
the batch is formed; read in Ray 2.60's ``serve/batching.py``). Under load that leaves the
model running many batches of one or two requests back to back, while the rest wait formed
and too small (measured here with Ray 2.60: 1.8 requests per forward at 32 concurrent
clients, with 32 requests waiting in the replica).

:class:`ForwardLane` sits behind ``@serve.batch``: it runs one forward at a time and merges
every batch that arrived meanwhile into the next one, up to ``max_items`` - continuous
batching, with Serve still forming the batches and owning the requests' lifecycle.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class ForwardLane(Generic[T, R]):
    """Runs ``run(items)`` for one merged list at a time; ``submit`` returns its items'
    results (``run`` returns one result per item, in order)."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._run = run
        self.max_items = max_items
        self._waiting: collections.deque[tuple[list[T], asyncio.Future[list[R]]]] = (
            collections.deque()
        )
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: list[T]) -> list[R]:
        """Queue ``items`` for the next forward pass and wait for their results."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[R]] = loop.create_future()
        self._waiting.append((items, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[T], asyncio.Future[list[R]]]]:
        """Whole submissions, oldest first, up to ``max_items`` (at least one)."""
        taken: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        n = 0
        while self._waiting:
            items, future = self._waiting[0]
            if taken and n + len(items) > self.max_items:
                break
            self._waiting.popleft()
            if future.done():  # its caller was cancelled while it waited
                continue
            taken.append((items, future))
            n += len(items)
        return taken

    async def _drain(self) -> None:
        while self._waiting:
            taken = self._take()
            if not taken:
                continue
            merged = [item for items, _ in taken for item in items]
            try:
                results = await self._run(merged)
                if len(results) != len(merged):
                    raise RuntimeError(f"{len(results)} results for {len(merged)} items")
            except Exception as exc:  # every caller in this pass gets the error
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in taken:
                if not future.done():
                    future.set_result(results[start : start + len(items)])
                start += len(items)
