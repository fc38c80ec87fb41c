"""The in-process path of a one-worker CPU job: :func:`training.worker.run_worker` runs in the
job's own process (the job runner's warm process, or a CLI run), without Ray Train: no
controller, no worker process, no process group to start and stop around seconds of training.

Same loop, metrics and progress records as the Ray Train path, through the same
:class:`~training.run_context.RunContext`. Checkpoints go to
``runs/{job_id}/local/epoch-NNNNNN/`` (``state.json`` written last: a directory without it is
an upload that did not finish, and is ignored), uploaded on a thread while the next epoch
trains; the newest two are kept. A run resumes from the newest complete one. The best epoch's
weights stay in this process (``RunContext.keep_best``): no checkpoint of the last epoch, no
download. Ray-free: the caller (:func:`training.ray_train.fit`) reserves the CPUs.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from training.checkpoints import STATE_FILE
from training.progress import EpochProgress, StepProgress
from training.run_context import FitResult, RunContext, RunInputs, ValOutputs
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore
from training.worker import run_worker

KEEP = 2
"""Complete checkpoints kept per job (the newest)."""

_EPOCH_DIR = re.compile(r"epoch-\d{6}")


def checkpoint_prefix(job_id: str) -> str:
    """Where a job's in-process checkpoints go: ``runs/{job_id}/local/``."""
    return f"{JobStore.run_prefix(job_id)}/local/"


def stored_checkpoints(store: ObjectStore, job_id: str) -> list[str]:
    """Prefixes of a job's complete in-process checkpoints, oldest first."""
    prefix = checkpoint_prefix(job_id)
    found = []
    for obj in store.list(prefix):
        name, _, file = obj.key.removeprefix(prefix).partition("/")
        if file == STATE_FILE and _EPOCH_DIR.fullmatch(name):
            found.append(f"{prefix}{name}/")
    return sorted(found)


class _Uploads:
    """A run's checkpoints to the store, in order, on one thread while training goes on."""

    def __init__(self, store: ObjectStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self.pending: list[Future[None]] = []

    def submit(self, epoch: int, directory: Path) -> None:
        """Upload ``directory`` as the checkpoint of ``epoch`` (then remove it)."""
        self.pending.append(self.pool.submit(self._upload, epoch, directory))

    def _upload(self, epoch: int, directory: Path) -> None:
        target = f"{checkpoint_prefix(self.job_id)}epoch-{epoch:06d}/"
        try:
            for path in sorted(directory.iterdir()):
                if path.name != STATE_FILE:
                    self.store.upload_file(target + path.name, path)
            self.store.upload_file(target + STATE_FILE, directory / STATE_FILE)  # complete
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        for old in stored_checkpoints(self.store, self.job_id)[:-KEEP]:
            # state.json first: a half-deleted checkpoint is incomplete, never resumed
            self.store.delete(old + STATE_FILE)
            for obj in list(self.store.list(old)):
                self.store.delete(obj.key)

    def wait(self) -> float:
        """Block until every upload has finished (raising the first failure); the seconds
        it waited."""
        started = time.perf_counter()
        for future in self.pending:
            future.result()
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the thread; uploads not yet begun are dropped (the run failed anyway)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


def _resume_dir(store: ObjectStore, job_id: str, workdir: Path) -> Path | None:
    """The newest complete checkpoint of an earlier attempt, downloaded (None: none)."""
    found = stored_checkpoints(store, job_id)
    if not found:
        return None
    target = Path(tempfile.mkdtemp(prefix="resume-", dir=workdir))
    for obj in store.list(found[-1]):
        store.download_file(obj.key, target / obj.key.removeprefix(found[-1]))
    return target


def fit_here(inputs: RunInputs, *, job_id: str, workdir: Path) -> FitResult:
    """Train one worker in this process; the best epoch's weights come back in memory."""
    store = ObjectStore(inputs.s3)
    progress = EpochProgress(
        store, JobStore.progress_key(job_id), echo=inputs.training.echo_progress
    )
    uploads = _Uploads(store, job_id)
    last: dict[str, Any] = {}
    kept: dict[str, Any] = {}

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        last.clear()
        last.update(metrics)
        progress.record(metrics)
        if checkpoint is not None:
            uploads.submit(int(metrics["epoch"]), checkpoint)

    def keep_best(
        weights: dict[str, torch.Tensor], state: dict[str, Any], outputs: ValOutputs | None
    ) -> None:
        kept.update(weights=weights, state=state, outputs=outputs)

    ctx = RunContext(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        wrap_model=lambda m: m,
        report=report,
        resume_from=_resume_dir(store, job_id, workdir),
        on_step=StepProgress(store, JobStore.step_key(job_id), inputs.training.progress_interval_s),
        keep_best=keep_best,
    )
    threads = torch.get_num_threads()  # this process may serve other work after the job
    torch.set_num_threads(max(1, int(inputs.training.cpus_per_worker)))
    try:
        returned = run_worker(inputs, ctx)
        waited = uploads.wait()
    finally:
        uploads.close()
        torch.set_num_threads(threads)
    if "timing" in returned:  # the last upload, as far as the end of the run waited for it
        returned["timing"]["checkpoints_s"] = round(returned["timing"]["checkpoints_s"] + waited, 3)
        returned["timing"]["ended_at"] = time.time()
    metrics = {**last, **returned}
    storage = store.uri(checkpoint_prefix(job_id))
    if "weights" not in kept:  # a data error: nothing trained
        return FitResult(metrics, None, {}, storage)
    state = kept["state"]
    best = {"epoch": state.get("kept_epoch", state["epoch"]), "val_top1": state.get("kept_top1")}
    return FitResult(metrics, kept["weights"], best, storage, state, kept["outputs"])


__all__ = ["checkpoint_prefix", "fit_here", "stored_checkpoints"]
