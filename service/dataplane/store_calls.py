"""Store calls from an event loop run here: in a thread pool of their own, so a store that
hangs (until its request-path timeouts give up) never takes the threads that decode images
and run forward passes (``asyncio.to_thread``'s default pool has only cpus + 4)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

STORE_THREADS = 16
"""Store calls in flight at once per process; more wait their turn (they never block the
event loop either way)."""

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # created on first use, in the process that uses it
        _pool = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="refit-store")
    return _pool


async def store_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the store pool, awaited."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))
