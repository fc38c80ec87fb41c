"""Fine-tune jobs, as the API uses them: create and cancel through a :class:`Scheduler`
(the job runner), read records and progress straight from the store (so reads work while
the runner restarts). Every store call runs off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from service.dataplane.curve import render_curve
from service.dataplane.store_calls import store_call
from training.storage.jobs import JobRecord, JobStore, progress_view
from training.storage.s3 import ObjectStore


class Scheduler(Protocol):
    """Where jobs are queued and run: the runner actor (``service.control.scheduler``)."""

    async def create(self, spec: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        """Queue a job: ``{"record": ..., "created": bool}``."""
        ...

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; its record afterwards."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Queued and running jobs, finished counts (empty when no runner exists)."""
        ...

    async def labels_arrived(self, model: str) -> None:
        """A label of ``model`` was stored: evaluate its retrain policies soon, not at the
        next ``policy_check_s`` (best effort, never raises, never waits for the runner)."""
        ...


def job_view(record: JobRecord, progress: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it: the record, its progress and links."""
    base = f"/v1/finetune-jobs/{record.job_id}"
    return {
        **record.model_dump(),
        "progress": progress_view(progress),
        "links": {"self": base, "cancel": f"{base}/cancel", "curve": f"{base}/curve.png"},
    }


class JobsUseCases:
    """Fine-tune jobs for the HTTP API."""

    def __init__(self, store: ObjectStore, scheduler: Scheduler) -> None:
        self.jobs = JobStore(store)
        self.scheduler = scheduler

    async def create(
        self, spec: dict[str, Any], idempotency_key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Queue a job; returns its view and whether it was created (False: a replay)."""
        out = await self.scheduler.create(spec, idempotency_key)
        record = JobRecord.model_validate(out["record"])
        return job_view(record, {}), bool(out["created"])

    async def labels_arrived(self, model: str) -> None:
        """Tell the runner a label of ``model`` was stored (its policies are looked at
        soon)."""
        await self.scheduler.labels_arrived(model)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (409 once it has ended)."""
        out = await self.scheduler.cancel(job_id)
        return job_view(JobRecord.model_validate(out), await self._progress(job_id))

    async def get(self, job_id: str) -> dict[str, Any]:
        """One job with its progress."""
        record = await store_call(self.jobs.get, job_id)
        return job_view(record, await self._progress(job_id))

    async def list(self, *, limit: int, state: str | None) -> list[dict[str, Any]]:
        """Jobs, newest first (records only; progress is on each job's own page)."""
        records = await store_call(self.jobs.list_jobs, limit=limit, state=state)
        return [job_view(r, {}) for r in records]

    async def curve(self, job_id: str) -> bytes:
        """The job's training curve as PNG."""
        await store_call(self.jobs.get, job_id)  # 404 for an unknown job
        view = progress_view(await self._progress(job_id))
        return await asyncio.to_thread(render_curve, view["history"])

    async def _progress(self, job_id: str) -> dict[str, Any]:
        return await store_call(self.jobs.progress, job_id)

    async def stats(self) -> dict[str, Any]:
        """Queued/running/finished counts and the images/s of running jobs (for /metrics)."""
        stats = await self.scheduler.stats()
        rate = 0.0
        for job_id in stats.get("running_jobs", []):
            view = progress_view(await self._progress(job_id))
            rate += float(view["images_per_s"] or 0.0)
        if stats:
            stats["images_per_s"] = rate
        return stats
