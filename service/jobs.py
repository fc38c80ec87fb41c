"""The API's side of fine-tune jobs: create and cancel through the job runner actor, read
records and progress straight from the store (so reads work while the runner restarts)."""

from __future__ import annotations

import asyncio
from typing import Any

from training.curve import render_curve
from training.errors import RefitError
from training.jobs import JobRecord, JobStore, progress_view
from training.runner import existing_runner, runner_actor
from training.settings import RefitSettings
from training.store import ObjectStore


def unwrap(exc: Exception) -> Exception:
    """Our own error raised inside an actor or task, else the exception itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RefitError) else exc


def job_view(record: JobRecord, progress: dict[str, Any]) -> dict[str, Any]:
    """A job as the API shows it: the record, its progress and links."""
    base = f"/v1/finetune-jobs/{record.job_id}"
    return {
        **record.model_dump(),
        "progress": progress_view(progress),
        "links": {"self": base, "cancel": f"{base}/cancel", "curve": f"{base}/curve.png"},
    }


class JobsBackend:
    """Fine-tune jobs for the HTTP API."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        self.jobs = JobStore(ObjectStore(settings.s3))
        self._runner: Any = None

    def runner(self) -> Any:
        """The runner actor (created on first use; it is detached and outlives us)."""
        if self._runner is None:
            self._runner = runner_actor(self.settings)
        return self._runner

    async def create(
        self, spec: dict[str, Any], idempotency_key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Queue a job; returns its view and whether it was created (False: a replay)."""
        try:
            out = await self.runner().create.remote(spec, idempotency_key)
        except Exception as exc:
            raise unwrap(exc) from None
        record = JobRecord.model_validate(out["record"])
        return job_view(record, {}), bool(out["created"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (409 once it has ended)."""
        try:
            out = await self.runner().cancel.remote(job_id)
        except Exception as exc:
            raise unwrap(exc) from None
        return job_view(JobRecord.model_validate(out), await self._progress(job_id))

    async def get(self, job_id: str) -> dict[str, Any]:
        """One job with its progress."""
        record = await asyncio.to_thread(self.jobs.get, job_id)
        return job_view(record, await self._progress(job_id))

    async def list(self, *, limit: int, state: str | None) -> list[dict[str, Any]]:
        """Jobs, newest first (records only; progress is on each job's own page)."""
        records = await asyncio.to_thread(self.jobs.list_jobs, limit=limit, state=state)
        return [job_view(r, {}) for r in records]

    async def curve(self, job_id: str) -> bytes:
        """The job's training curve as PNG."""
        await asyncio.to_thread(self.jobs.get, job_id)  # 404 for an unknown job
        view = progress_view(await self._progress(job_id))
        return await asyncio.to_thread(render_curve, view["history"])

    async def _progress(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.jobs.progress, job_id)

    async def stats(self) -> dict[str, Any]:
        """Queued/running/finished counts and the images/s of running jobs (for /metrics).
        Empty when no runner exists yet (a scrape never creates one)."""
        runner = existing_runner(self.settings)
        if runner is None:
            return {}
        try:
            stats: dict[str, Any] = await asyncio.wait_for(runner.stats.remote(), 2)
        except Exception:
            return {}
        rate = 0.0
        for job_id in stats.get("running_jobs", []):
            view = progress_view(await self._progress(job_id))
            rate += float(view["images_per_s"] or 0.0)
        stats["images_per_s"] = rate
        return stats
