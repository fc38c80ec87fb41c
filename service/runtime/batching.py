"""One forward pass at a time, on a thread of its own, fed by every request that queued while
the last one ran.

``@serve.batch`` forms a batch from what arrives within its wait window and hands it to the
batch function at once, whether or not the previous batch has finished (the
``max_concurrent_batches`` semaphore, added by ray-project/ray PR #53096, is taken *after*
the batch is formed; read in Ray 2.60's ``serve/batching.py``). Under load that leaves the
model running many batches of one or two requests back to back, while the rest wait formed
and too small (measured here with Ray 2.60: 1.8 requests per forward at 32 concurrent
clients, with 32 requests waiting in the replica).

:class:`ForwardLane` runs one forward at a time and merges every submission that arrived
meanwhile into the next one, up to ``max_items`` - continuous batching. The forward passes run
on the lane's own thread, which takes the next batch the moment the last one ends: it never
waits for the event loop (busy with HTTP, decoding and answers under load) to hand it one.
Results go back to each caller's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_Waiting = tuple[list[T], "asyncio.Future[list[R]]", asyncio.AbstractEventLoop]


def _settle(
    future: asyncio.Future[list[R]], result: list[R] | None, exc: BaseException | None
) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class ForwardLane(Generic[T, R]):
    """Runs ``run(items)`` (blocking: on the lane's thread) for one merged list at a time;
    ``submit`` returns its items' results (``run`` returns one result per item, in order)."""

    def __init__(
        self, run: Callable[[list[T]], list[R]], max_items: int, *, name: str = "refit-forward"
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._run = run
        self.max_items = max_items
        self._name = name
        self._waiting: collections.deque[_Waiting[T, R]] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def submit(self, items: list[T]) -> list[R]:
        """Queue ``items`` for the next forward pass and wait for their results."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[R]] = loop.create_future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the forward lane is closed")
            self._waiting.append((items, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._wake.notify()
        return await future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the lane's thread once the passes already queued have run."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _take(self) -> list[_Waiting[T, R]]:
        """Whole submissions, oldest first, up to ``max_items`` (at least one); called with
        ``_wake`` held."""
        taken: list[_Waiting[T, R]] = []
        n = 0
        while self._waiting:
            items, future, loop = self._waiting[0]
            if taken and n + len(items) > self.max_items:
                break
            self._waiting.popleft()
            if future.done():  # its caller was cancelled while it waited (a benign read)
                continue
            taken.append((items, future, loop))
            n += len(items)
        return taken

    def _main(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:  # closed, nothing left
                    return
                taken = self._take()
            if taken:
                self._pass(taken)

    def _pass(self, taken: list[_Waiting[T, R]]) -> None:
        merged = [item for items, _, _ in taken for item in items]
        try:
            results = self._run(merged)
            if len(results) != len(merged):
                raise RuntimeError(f"{len(results)} results for {len(merged)} items")
        except Exception as exc:  # every caller in this pass gets the error
            for _, future, loop in taken:
                _call_soon(loop, future, None, exc)
            return
        start = 0
        for items, future, loop in taken:
            _call_soon(loop, future, results[start : start + len(items)], None)
            start += len(items)


def _call_soon(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[list[R]],
    result: list[R] | None,
    exc: BaseException | None,
) -> None:
    # a caller's loop that has closed raises: nobody waits for that answer any more
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, result, exc)
