"""The one module that knows Ray Train (and starts or joins Ray).

``fit`` runs :func:`training.worker.run_worker` on ``spec.workers`` data-parallel workers (DDP:
gloo on CPU, nccl on GPU), checkpoints every epoch to ``runs/{job_id}`` on the object store
through Ray Train's storage, and survives worker deaths (``FailureConfig``), resuming from the
last reported checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback

from training.job_settings import RaySettings
from training.run_context import RunContext, RunInputs
from training.storage.errors import ResourceError, TrainingError
from training.storage.job_records import JobStore
from training.storage.s3 import ObjectStore
from training.worker import run_worker

log = logging.getLogger(__name__)


def ensure_ray(settings: RaySettings) -> bool:
    """Join the configured Ray cluster or start a local one. Returns True if we started it.

    Unset, a new local cluster starts even when ``RAY_ADDRESS`` names another one (another
    cluster may run on this host). Once connected, ``RAY_ADDRESS`` names this cluster, so what
    this process starts reaches it by address, never by discovery. The dashboard stays off:
    its port must never be exposed (CVE-2023-48022).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": settings.include_dashboard}
    if settings.address:
        ray.init(address=settings.address, **kwargs)
        started = False
    else:
        ray.init(address="local", num_cpus=settings.num_cpus, **kwargs)
        started = True
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return started


def cluster_env() -> dict[str, str]:
    """Environment for Ray work Refit starts: this cluster's address. Ray Train's helpers
    (its placement-group cleaner) look a cluster up through ``RAY_ADDRESS``; without it they
    discover one, and fail or pick a stranger's when two clusters share the host."""
    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


class _TrainerHost:
    """Runs ``trainer.fit()`` in an actor whose runtime env names the cluster: the Train
    controller and its helpers inherit it (a driver's job env cannot change once it
    connected). An actor, not a task, so it dies with whoever started the run (a cancelled
    job's process), and the controller and workers below it go too."""

    def fit(self, trainer: Any) -> Any:
        """The trainer's result."""
        return trainer.fit()


def check_resources(*, workers: int, use_gpu: bool, cpus_per_worker: float) -> None:
    """ResourceError naming ``workers`` when the cluster cannot host the worker group."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if use_gpu and workers > gpus:
        raise ResourceError(
            f"{workers} GPU workers requested; the cluster has {gpus:g} GPUs", field="workers"
        )
    if workers * cpus_per_worker > cpus:
        raise ResourceError(
            f"{workers} workers x {cpus_per_worker:g} CPU requested; the cluster has {cpus:g} CPUs",
            field="workers",
        )


class _Progress(UserCallback):
    """Runs on the Ray Train controller: logs each epoch and stores it, with the history of
    all epochs (the training curve), for the driver and the API."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store, self.key = store, key
        self.history: dict[int, dict[str, float]] = {}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        m = dict(metrics[0]) if metrics else {}
        if "epoch" in m:
            # keyed by epoch: an epoch repeated after a resume replaces the lost attempt
            self.history[int(m["epoch"])] = {
                k: float(m[k])
                for k in ("train_loss", "val_loss", "val_top1", "images_per_s", "epoch_s")
                if k in m
            }
            m["history"] = [{"epoch": e, **h} for e, h in sorted(self.history.items())]
            print(
                f"[refit] epoch {m['epoch']}/{m['epochs']} loss {m['train_loss']:.4f} "
                f"val top1 {m['val_top1']:.4f} {m['images_per_s']:.1f} img/s "
                f"eta {m['eta_s']:.0f}s",
                flush=True,
            )
        try:
            self.store.put_json(self.key, m)
        except Exception as exc:  # progress is best effort; never fail training for it
            log.warning("could not store progress: %s", exc)


class _StepProgress:
    """Rank 0's progress within an epoch, written at most every ``interval`` seconds."""

    def __init__(self, store: ObjectStore, key: str, interval: float) -> None:
        self.store, self.key, self.interval = store, key, interval
        self.last = 0.0

    def __call__(self, step: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        try:
            self.store.put_json(self.key, {**step, "time": time.time()})
        except Exception as exc:  # progress is best effort; never fail training for it
            log.warning("could not store step progress: %s", exc)


def _record_placement_group(store: ObjectStore, job_id: str) -> None:
    # Ray Train V2 frees its worker reservation through the State API, which needs the
    # dashboard - off by design here. Record the group so the job runner can free it when it
    # stops the job (cancel, or a retry after a runner restart). One key per group: no races.
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        store.put_json(f"{JobStore.placement_groups_prefix(job_id)}{pg.id.hex()}.json", {})


def _train_fn(config: dict[str, Any]) -> dict[str, Any]:
    inputs: RunInputs = config["inputs"]
    ctx = ray.train.get_context()
    on_step = None
    if ctx.get_world_rank() == 0:
        _record_placement_group(ObjectStore(inputs.s3), config["job_id"])
        on_step = _StepProgress(
            ObjectStore(inputs.s3),
            JobStore.step_key(config["job_id"]),
            inputs.training.progress_interval_s,
        )
    torch_threads = max(1, int(inputs.training.cpus_per_worker))
    import torch

    torch.set_num_threads(torch_threads)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def run(resume_from: Path | None) -> dict[str, Any]:
        return run_worker(
            inputs,
            RunContext(
                rank=ctx.get_world_rank(),
                world_size=ctx.get_world_size(),
                device=ray.train.torch.get_device(),
                wrap_model=ray.train.torch.prepare_model,
                report=report,
                resume_from=resume_from,
                on_step=on_step,
            ),
        )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return run(None)
    with checkpoint.as_directory() as directory:
        return run(Path(directory))


@dataclass
class FitResult:
    """What a finished run left: the best checkpoint's weights dir and the last metrics."""

    metrics: dict[str, Any]
    best_dir: Path | None
    best_metrics: dict[str, Any]
    storage_uri: str


def fit(inputs: RunInputs, *, job_id: str, workdir: Path) -> FitResult:
    """Run the distributed training job and download its best checkpoint into ``workdir``."""
    spec, limits = inputs.spec, inputs.training
    store = ObjectStore(inputs.s3)
    runs = JobStore.run_prefix(job_id)
    cpus = limits.cpus_per_worker
    if limits.check_cluster_resources:
        check_resources(workers=spec.workers, use_gpu=spec.use_gpu, cpus_per_worker=cpus)
    trainer = ray.train.torch.TorchTrainer(
        _train_fn,  # type: ignore[arg-type]  # V2 keeps the function's return value
        train_loop_config={"inputs": inputs, "job_id": job_id},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if spec.use_gpu else {})},
        ),
        # mypy sees ray.train's V1 classes; at run time these names are Train V2's (default).
        run_config=RunConfig(  # type: ignore[call-arg]
            name=job_id,
            storage_path=store.arrow_path("runs"),
            storage_filesystem=store.arrow_filesystem(),
            failure_config=FailureConfig(max_failures=limits.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            callbacks=[_Progress(store, JobStore.progress_key(job_id))],  # type: ignore[list-item]
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus)))}},
        ),
    )
    host: Any = (
        ray.remote(num_cpus=0, max_restarts=0)(_TrainerHost)
        .options(runtime_env={"env_vars": cluster_env()})
        .remote()
    )
    try:
        result: ray.train.Result = ray.get(host.fit.remote(trainer))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, ray.train.TrainingFailedError):
            raise TrainingError(f"training failed: {cause}") from cause
        raise cause from None
    finally:
        ray.kill(host)
    # metrics of the last checkpoint, plus what rank 0 returned (e.g. a data error)
    returned = result.return_value or {}  # type: ignore[attr-defined]  # V2 Result
    metrics = {**(result.metrics or {}), **returned}
    best = [(c, m) for c, m in (result.best_checkpoints or []) if "val_top1" in m]
    if not best:
        return FitResult(metrics, None, {}, store.uri(runs))
    # Highest val top-1; the later epoch wins a tie (it has seen more data).
    checkpoint, best_metrics = max(best, key=lambda cm: (cm[1]["val_top1"], cm[1]["epoch"]))
    target = Path(tempfile.mkdtemp(dir=workdir))
    checkpoint.to_directory(str(target))
    return FitResult(metrics, target, dict(best_metrics), store.uri(runs))


def release_placement_groups(store: ObjectStore, job_id: str) -> int:
    """Remove the placement groups a job's runs recorded that still exist; returns how many."""
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    live = {
        pg_id
        for pg_id, info in placement_group_table().items()
        if info.get("state") not in {"REMOVED", None}
    }
    removed = 0
    for obj in store.list(JobStore.placement_groups_prefix(job_id)):
        pg_id = obj.key.rsplit("/", 1)[1].removesuffix(".json")
        if pg_id in live:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed


__all__ = [
    "FitResult",
    "check_resources",
    "cluster_env",
    "ensure_ray",
    "fit",
    "release_placement_groups",
]
