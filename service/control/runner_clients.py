"""The data plane's :class:`~service.dataplane.jobs.Scheduler`, two ways: the runner actor
on a Ray cluster (:class:`RunnerScheduler`, what the Serve ingress uses), or a
:class:`~service.control.scheduler.JobRunner` object in this process
(:class:`InProcessScheduler`: tools and tests); and the runner actor itself, one per store
location, detached."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray

from service.control.notices import NAMESPACE, actor_name
from service.control.scheduler import JobRunner
from service.request_errors import unwrap_remote
from service.settings import RefitSettings


def runner_actor(settings: RefitSettings) -> Any:
    """The job runner of this store location (created on first use; detached, so it
    outlives the API replica that created it)."""
    return (
        ray.remote(num_cpus=0, max_restarts=-1)(JobRunner)
        .options(
            name=actor_name(settings, "jobs"),
            max_concurrency=8,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        )
        .remote(settings)
    )


def existing_runner(settings: RefitSettings) -> Any | None:
    """The runner if one exists (never creates one: a metrics scrape must not)."""
    try:
        return ray.get_actor(actor_name(settings, "jobs"), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_actors(settings: RefitSettings) -> None:
    """Kill the runner and the notice actor of this location (tests; ``refit up`` exit)."""
    for kind in ("jobs", "events"):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(actor_name(settings, kind), namespace=NAMESPACE))


class RunnerScheduler:
    """The data plane's :class:`~service.dataplane.jobs.Scheduler` on a Ray cluster: the
    detached runner actor of this store location."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        self._runner: Any = None

    def runner(self) -> Any:
        """The runner actor (created on first use; it is detached and outlives us)."""
        if self._runner is None:
            self._runner = runner_actor(self.settings)
        return self._runner

    async def create(self, spec: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        """Queue a job on the runner."""
        try:
            out: dict[str, Any] = await self.runner().create.remote(spec, idempotency_key)
        except Exception as exc:
            raise unwrap_remote(exc) from None
        return out

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job on the runner."""
        try:
            out: dict[str, Any] = await self.runner().cancel.remote(job_id)
        except Exception as exc:
            raise unwrap_remote(exc) from None
        return out

    async def labels_arrived(self, model: str) -> None:
        """Wake the runner's policy pass (a call not waited for: a label's answer never
        waits on the runner; no runner yet, nothing to wake)."""
        if self._runner is None:  # a name lookup at the GCS: off the event loop
            self._runner = await asyncio.to_thread(existing_runner, self.settings)
        if self._runner is not None:
            self._runner.labels_arrived.remote(model)

    async def stats(self) -> dict[str, Any]:
        """The runner's counts; empty when no runner exists yet (a scrape never creates
        one) or it does not answer within 2 s."""
        runner = existing_runner(self.settings)
        if runner is None:
            return {}
        try:
            stats: dict[str, Any] = await asyncio.wait_for(runner.stats.remote(), 2)
        except Exception:
            return {}
        return stats


class InProcessScheduler:
    """A :class:`~service.dataplane.jobs.Scheduler` over a :class:`JobRunner` object in this
    process (tools and tests; its launcher decides where jobs run)."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    async def create(self, spec: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        """Queue a job."""
        return await asyncio.to_thread(self.runner.create, spec, idempotency_key)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job."""
        return await asyncio.to_thread(self.runner.cancel, job_id)

    async def labels_arrived(self, model: str) -> None:
        """Wake the runner's policy pass."""
        self.runner.labels_arrived(model)

    async def stats(self) -> dict[str, Any]:
        """The runner's counts."""
        return self.runner.stats()
