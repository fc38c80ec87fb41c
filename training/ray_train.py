"""The one module that knows Ray Train (and starts or joins Ray).

``fit`` runs :func:`training.worker.run_worker` on ``spec.workers`` data-parallel workers (DDP:
gloo on CPU, nccl on GPU), checkpoints to ``runs/{job_id}`` on the object store through Ray
Train's storage (uploaded while the next epoch trains), and survives worker deaths
(``FailureConfig``), resuming from the last reported checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
from ray.train import (
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,  # pinned Ray 2.60: left out of every run (see _Trainer)
)

from training.checkpoints import (
    BEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_best_weights,
    load_checkpoint_state,
)
from training.job_settings import RaySettings
from training.local_fit import fit_here
from training.progress import EpochProgress, StepProgress
from training.run_context import FitResult, RunContext, RunInputs
from training.storage.errors import ResourceError, TrainingError
from training.storage.jobs import JobStore
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
    kwargs: dict[str, Any] = {
        "include_dashboard": settings.include_dashboard,
        "log_to_driver": settings.log_to_driver,
    }
    if settings.address:
        context = ray.init(address=settings.address, **kwargs)
        started = False
    else:
        context = ray.init(address="local", num_cpus=settings.num_cpus, **kwargs)
        started = True
    _SESSION["dir"] = getattr(context, "address_info", {}).get("session_dir")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return started


_SESSION: dict[str, str | None] = {"dir": None}


def session_logs() -> Path | None:
    """The logs folder of the Ray session this process joined (None: not joined here)."""
    found = _SESSION["dir"]
    return Path(found) / "logs" if found else None


CONTROLLER_POLL_S = 0.25
"""How often a Train controller looks at its workers. Ray's default (2 s) is paid at every
start and end of a run: a few seconds of a small job; a poll is one actor call."""


def cluster_env() -> dict[str, str]:
    """Environment for Ray work Refit starts: this cluster's address, and the Train
    controller's poll (Ray Train hands it on to the controllers started below). Ray Train's
    helpers (its placement-group cleaner) look a cluster up through ``RAY_ADDRESS``; without
    it they discover one, and fail or pick a stranger's when two clusters share the host."""
    return {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(CONTROLLER_POLL_S),
    }


def _in_cluster_env() -> bool:
    """Whether this process is a Ray worker started with :func:`cluster_env` (the job
    runner's job process): what it starts inherits that environment."""
    ctx = ray.get_runtime_context()
    env = ctx.runtime_env.env_vars() if ctx.worker.mode == ray.WORKER_MODE else {}
    return all(env.get(k) == v for k, v in cluster_env().items())


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
    """Runs on the Ray Train controller: each report into the job's progress record."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.progress = EpochProgress(store, key)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        self.progress.record(dict(metrics[0]) if metrics else {})


def _record_placement_group(store: ObjectStore, job_id: str, pg: Any) -> None:
    # Ray Train V2 frees its worker reservation through the State API, which needs the
    # dashboard - off by design here. Record the group so the job runner can free it when it
    # stops the job (cancel, or a retry after a runner restart). One key per group: no races.
    if pg is not None:
        store.put_json(f"{JobStore.placement_groups_prefix(job_id)}{pg.id.hex()}.json", {})


RESERVE_TIMEOUT_S = 600.0
"""How long an in-process job waits for its CPUs (others' jobs or replicas hold them)."""


@contextlib.contextmanager
def _reserved(store: ObjectStore, job_id: str, cpus: float) -> Iterator[None]:
    """The CPUs of an in-process run, reserved on this node as Ray Train reserves its
    workers' (a placement group, recorded for the runner): serving replicas and other jobs
    are not placed on them while it trains."""
    from ray.util.placement_group import placement_group, remove_placement_group

    # on this process's node (Ray's own per-node resource), where the training runs: a
    # reservation elsewhere would leave this node's CPUs to replicas and other jobs
    node = f"node:{ray.util.get_node_ip_address()}"
    pg = placement_group([{"CPU": cpus, node: 0.001}])
    try:
        _record_placement_group(store, job_id, pg)
        if not pg.wait(timeout_seconds=RESERVE_TIMEOUT_S):
            raise ResourceError(
                f"no {cpus:g} CPUs free for the job within {RESERVE_TIMEOUT_S:g} s",
                field="workers",
            )
        yield
    finally:
        remove_placement_group(pg)


def _train_fn(config: dict[str, Any]) -> dict[str, Any]:
    entered = time.time()
    inputs: RunInputs = config["inputs"]
    ctx = ray.train.get_context()
    on_step = None
    if ctx.get_world_rank() == 0:
        _record_placement_group(
            ObjectStore(inputs.s3), config["job_id"], ray.util.get_current_placement_group()
        )
        on_step = StepProgress(
            ObjectStore(inputs.s3),
            JobStore.step_key(config["job_id"]),
            inputs.training.progress_interval_s,
        )
    torch_threads = max(1, int(inputs.training.cpus_per_worker))
    import torch

    torch.set_num_threads(torch_threads)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # uploaded while the next epoch trains; Ray deletes the directory once it is stored,
        # and the run ends only after the last upload
        ray.train.report(
            metrics,
            checkpoint=ckpt,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )

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
        returned = run(None)
    else:
        with checkpoint.as_directory() as directory:
            returned = run(Path(directory))
    if "timing" in returned:  # where a run's start went: this process's start, its boot
        returned["timing"]["process_started_at"] = psutil.Process().create_time()
        returned["timing"]["entered_at"] = entered
    return returned


def in_process(inputs: RunInputs) -> bool:
    """Whether a job trains in its own process (:mod:`training.local_fit`): one CPU worker,
    unless ``legacy_job_path``. A GPU job keeps Ray Train, which assigns it its GPU."""
    spec = inputs.spec
    return spec.workers == 1 and not spec.use_gpu and not inputs.training.legacy_job_path


def fit(inputs: RunInputs, *, job_id: str, workdir: Path) -> FitResult:
    """Train: one CPU worker in this process (:func:`in_process`), else the distributed
    Ray Train run, whose best epoch's weights are downloaded through ``workdir``."""
    spec, limits = inputs.spec, inputs.training
    store = ObjectStore(inputs.s3)
    runs = JobStore.run_prefix(job_id)
    cpus = limits.cpus_per_worker
    if limits.check_cluster_resources:
        check_resources(workers=spec.workers, use_gpu=spec.use_gpu, cpus_per_worker=cpus)
    if in_process(inputs):
        with _reserved(store, job_id, cpus):
            return fit_here(inputs, job_id=job_id, workdir=workdir)
    trainer = _Trainer(
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
            # the latest two: each carries the best epoch's weights (training.worker)
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_Progress(store, JobStore.progress_key(job_id))],  # type: ignore[list-item]
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus)))}},
        ),
    )
    try:
        result = _run_trainer(trainer)
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training failed: {exc}") from exc
    # metrics of the last checkpoint, plus what rank 0 returned (e.g. a data error)
    returned = result.return_value or {}  # V2 Result: the function's return
    metrics = {**(result.metrics or {}), **returned}
    if result.checkpoint is None:
        return FitResult(metrics, None, {}, store.uri(runs))
    target = Path(tempfile.mkdtemp(dir=workdir))
    _download_best(result.checkpoint, target)
    state = load_checkpoint_state(target)
    best = {"epoch": state.get("kept_epoch", state["epoch"]), "val_top1": state.get("kept_top1")}
    return FitResult(metrics, load_best_weights(target), best, store.uri(runs), state)


class _Trainer(ray.train.torch.TorchTrainer):
    """``TorchTrainer`` without Ray Train's placement-group cleaner. The cleaner is a detached
    actor that watches the controller through the State API, which needs the dashboard (off
    here: its port must never be exposed), so it logs a failure at every check for as long
    as it lives (hundreds of lines a run); the job runner frees a run's placement group
    itself (:func:`release_placement_groups`)."""

    def _create_default_callbacks(self) -> list[Any]:
        return [
            c
            for c in super()._create_default_callbacks()  # type: ignore[misc]  # V2's
            if not isinstance(c, PlacementGroupCleanerCallback)
        ]


def _run_trainer(trainer: Any) -> Any:
    """``trainer.fit()`` where the controller inherits :func:`cluster_env`: here in a job
    process started with it, else in a :class:`_TrainerHost` actor."""
    if _in_cluster_env():
        return trainer.fit()
    host: Any = (
        ray.remote(num_cpus=0, max_restarts=0)(_TrainerHost)
        .options(runtime_env={"env_vars": cluster_env()})
        .remote()
    )
    try:
        return ray.get(host.fit.remote(trainer))
    except ray.exceptions.RayTaskError as exc:
        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
    finally:
        ray.kill(host)


def _download_best(checkpoint: Any, target: Path) -> None:
    """The state and the best epoch's weights of a stored checkpoint into ``target``: the
    driver needs no optimizer state (two thirds of a fully trained checkpoint's bytes)."""
    fs = checkpoint.filesystem
    has_best = fs.get_file_info(f"{checkpoint.path}/{BEST_FILE}").is_file
    for name in (STATE_FILE, BEST_FILE if has_best else MODEL_FILE):
        with (
            fs.open_input_stream(f"{checkpoint.path}/{name}") as src,
            open(target / name, "wb") as dst,
        ):
            while chunk := src.read(8 << 20):
                dst.write(chunk)


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
    "check_resources",
    "cluster_env",
    "ensure_ray",
    "fit",
    "in_process",
    "release_placement_groups",
]
