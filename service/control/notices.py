"""Registry change notices: publish and promote push them, classifier replicas long-poll them.

A small detached Ray actor per store location keeps a sequence number per model. ``notify``
bumps it; ``wait`` returns as soon as any model the caller follows has a newer number (or at
the timeout). Polling the alias stays as the fallback, so a lost notice only delays a swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import ray

from service.settings import RefitSettings

log = logging.getLogger(__name__)

NAMESPACE = "refit"


def actor_name(settings: RefitSettings, kind: str) -> str:
    """A cluster-wide actor name for one store location (bucket and prefix), so two Refit
    deployments on one Ray cluster never share runners or notices."""
    where = f"{settings.s3.resolved_endpoint()}|{settings.s3.bucket}|{settings.s3.prefix}"
    return f"refit-{kind}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


class RegistryEvents:
    """Per-model change counters with long-poll waiting (an async actor)."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}
        self._changed: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._changed is None:  # created on the actor's event loop, not in __init__
            self._changed = asyncio.Event()
        return self._changed

    async def notify(self, model: str) -> int:
        """Record a change of ``model`` (new version published or alias moved)."""
        self.seq[model] = self.seq.get(model, 0) + 1
        event, self._changed = self._event(), asyncio.Event()
        event.set()
        return self.seq[model]

    async def wait(self, seen: dict[str, int], timeout_s: float) -> dict[str, int]:
        """The current numbers of the models in ``seen`` once one differs, or at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = {m: self.seq.get(m, 0) for m in seen}
            remaining = deadline - time.monotonic()
            if current != seen or remaining <= 0:
                return current
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), remaining)


def events_actor(settings: RefitSettings) -> Any:
    """The notice actor of this store location (created on first use, detached)."""
    return (
        ray.remote(num_cpus=0)(RegistryEvents)
        .options(
            name=actor_name(settings, "events"),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_concurrency=1000,  # each replica holds one long-poll open
        )
        .remote()
    )


def notify(settings: RefitSettings, model: str) -> None:
    """Tell the replicas ``model`` changed (best effort: polling catches up otherwise)."""
    try:
        ray.get(events_actor(settings).notify.remote(model), timeout=5)
    except Exception as exc:
        log.warning("could not push the change of %s: %s", model, exc)


async def notify_async(settings: RefitSettings, model: str) -> None:
    """:func:`notify` from an event loop."""
    try:
        await asyncio.wait_for(events_actor(settings).notify.remote(model), 5)
    except Exception as exc:
        log.warning("could not push the change of %s: %s", model, exc)


__all__ = ["NAMESPACE", "RegistryEvents", "actor_name", "events_actor", "notify", "notify_async"]
