"""One training run on one worker: Ray-free, driven through a :class:`RunContext`.

Ray Train's worker function (``ray_train.py``) and the plain-torch benchmarks both call
:func:`run_worker`; only the context differs (how to wrap the model for DDP, where metrics and
checkpoints go, which checkpoint to resume from). The run, step by step:

1. build the model with its base weights and the freeze plan; resume from a checkpoint;
2. scan the images once: every rank drops the same unreadable ones (shards stay equal);
3. build the loaders: cached backbone features (head only) or images;
4. train epoch by epoch, evaluating after each, and checkpointing after the epoch that ends
   ``checkpoint_interval_s`` after the last checkpoint and after the last epoch (not the last
   where the run's own process keeps the result: ``RunContext.keep_best``); rank 0 keeps the
   best epoch's weights in memory and every checkpoint carries them.
"""

from __future__ import annotations

import math
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from training.backbones import build_backbone, structure
from training.checkpoints import (
    BEST_FILE,
    load_best_weights,
    load_checkpoint_state,
    load_checkpoint_weights,
    load_optimizer_state,
    save_checkpoint,
)
from training.data import Sample
from training.feature_stats import collect_outputs
from training.freeze import (
    FreezePlan,
    apply_freeze,
    param_groups,
    plan_freeze,
    set_frozen_batchnorm,
)
from training.loop import (
    Precision,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
)
from training.run_context import RunContext, RunInputs, ValOutputs
from training.run_data import (
    Loaders,
    StoredFeatures,
    WorkerImages,
    data_error,
    feature_loaders,
    image_loaders,
    scan_unreadable,
)
from training.spec import FinetuneSpec
from training.weights import load_base_weights


def _sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def build_model(inputs: RunInputs) -> tuple[nn.Module, FreezePlan]:
    """The model with base weights loaded and the freeze policy applied."""
    model = None
    if inputs.base_state is not None and inputs.keep_head:
        # every tensor comes from the base (a retrain with the same classes): no random init
        # computed only to be overwritten; copies, since training changes them
        model = structure(inputs.backbone, num_classes=len(inputs.classes))
        base = {k: v.clone() for k, v in inputs.base_state.items()}
        load_base_weights(model, inputs.backbone, base, keep_head=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model = None  # a tensor outside the state dict: built and loaded the plain way
    if model is None:
        model = build_backbone(inputs.backbone, num_classes=len(inputs.classes))
        if inputs.base_state is not None:
            load_base_weights(model, inputs.backbone, inputs.base_state, keep_head=inputs.keep_head)
    plan = plan_freeze(inputs.spec.freeze, model, inputs.backbone)
    apply_freeze(model, plan)
    return model, plan


def _resume(model: nn.Module, ctx: RunContext) -> tuple[dict[str, Any], int]:
    """The run's state (epoch, best score, history) and the epoch it resumed from."""
    if ctx.resume_from is None:
        return {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": []}, 0
    state = load_checkpoint_state(ctx.resume_from)
    model.load_state_dict(load_checkpoint_weights(ctx.resume_from))
    return state, int(state["epoch"])


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


class _Outputs:
    """One validation pass's outputs as :class:`ValOutputs` (None when not collected)."""

    def __init__(self, keys: list[str] | None, seen: list[tuple[torch.Tensor, torch.Tensor]]):
        self.keys, self.seen = keys, seen

    def done(self) -> ValOutputs | None:
        if self.keys is None or not self.seen:
            return None
        features = torch.cat([f for f, _ in self.seen])
        if len(features) != len(self.keys):
            return None
        return ValOutputs(self.keys, features, torch.cat([o for _, o in self.seen]))


@contextmanager
def _val_outputs(
    model: nn.Module,
    inputs: RunInputs,
    ctx: RunContext,
    loaders: Loaders,
    precision: Precision,
    val: list[Sample],
) -> Iterator[_Outputs]:
    """Collect the validation pass's outputs where the publishing process can use them: the
    run's own process (one worker), the whole model on images, in fp32."""
    wanted = (
        ctx.keep_best is not None
        and ctx.world_size == 1
        and not loaders.feature_cache
        and not precision.bf16
    )
    if not wanted:
        yield _Outputs(None, [])
        return
    with collect_outputs(model, inputs.backbone) as seen:
        yield _Outputs([s.key for s in val], seen)


class _BestWeights:
    """Rank 0's copy of the best epoch's weights by val top-1 (the later epoch wins a tie:
    it has seen more data), recorded in the run's state as ``kept_epoch``/``kept_top1``."""

    def __init__(self, state: dict[str, Any], ctx: RunContext, model: nn.Module) -> None:
        self.keeps = ctx.rank == 0
        self.state = state
        self.weights: dict[str, torch.Tensor] | None = None
        self.outputs: ValOutputs | None = None  # of the best epoch, when this attempt ran it
        if self.keeps and ctx.resume_from is not None and "kept_epoch" in state:
            has_own = (ctx.resume_from / BEST_FILE).exists()
            self.weights = load_best_weights(ctx.resume_from) if has_own else _copy(model)

    def offer(
        self, model: nn.Module, epoch: int, top1: float, outputs: ValOutputs | None = None
    ) -> None:
        """Keep this epoch's weights (and validation ``outputs``) if they are the best so
        far."""
        if top1 >= self.state.get("kept_top1", -1.0):
            self.state["kept_epoch"], self.state["kept_top1"] = epoch, top1
            if self.keeps:
                self.weights, self.outputs = _copy(model), outputs

    def beside(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The weights a checkpoint of ``epoch`` carries besides its model (None: that
        epoch's are the best)."""
        return None if self.state.get("kept_epoch") == epoch else self.weights


def _optimizer(
    model: nn.Module, plan: FreezePlan, spec: FinetuneSpec, steps_per_epoch: int, ctx: RunContext
) -> tuple[Any, Any]:
    """Optimizer over the plan's parameter groups and its schedule (restored on resume)."""
    optimizer = build_optimizer(
        param_groups(model, plan, weight_decay=spec.weight_decay),
        name=spec.optimizer,
        lr=spec.lr,
        momentum=spec.momentum,
    )
    scheduler = build_scheduler(
        optimizer,
        plan,
        steps_per_epoch=steps_per_epoch,
        epochs=spec.epochs,
        warmup_epochs=spec.warmup_epochs,
    )
    if ctx.resume_from is not None:
        load_optimizer_state(ctx.resume_from, optimizer, scheduler)
    return optimizer, scheduler


class _StepReporter:
    """Turns the loop's step callback into the context's progress reports for one epoch."""

    def __init__(self, ctx: RunContext, spec: FinetuneSpec, epoch: int, steps: int) -> None:
        self.ctx, self.spec, self.epoch, self.steps = ctx, spec, epoch, steps
        self.started = time.perf_counter()

    def __call__(self, step: int, images: int) -> None:
        if self.ctx.on_step is None:
            return
        seconds = time.perf_counter() - self.started
        self.ctx.on_step(
            {
                "epoch": self.epoch,
                "epochs": self.spec.epochs,
                "step": step,
                "steps_per_epoch": self.steps,
                # this rank's rate times the group size (shards are equal)
                "images_per_s": images * self.ctx.world_size / max(1e-9, seconds),
            }
        )


def _epoch_metrics(
    *,
    spec: FinetuneSpec,
    state: dict[str, Any],
    stats: dict[str, float],
    val: dict[str, Any],
    loaders: Loaders,
    ctx: RunContext,
    seconds_per_epoch: float,
    resumed_from: int,
    skipped: int,
) -> tuple[dict[str, Any], bool]:
    """Update the run's state with one finished epoch; its report, and whether to stop."""
    images, seconds = _sum([stats["train_images"], stats["train_seconds"]])
    done = int(state["epoch"]) + 1
    if val["top1"] > state["best_top1"]:
        state["best_top1"], state["best_epoch"] = val["top1"], done
    state["epoch"] = done
    state["history"].append(
        {
            "epoch": done,
            "train_loss": stats["train_loss"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
        }
    )
    patience = spec.early_stopping_patience
    stop = patience is not None and done - state["best_epoch"] >= patience
    metrics = {
        "epoch": done,
        "epochs": spec.epochs,
        "steps": int(stats["steps"]) * done,
        "steps_per_epoch": loaders.steps_per_epoch,
        "train_loss": stats["train_loss"],
        # throughput of the whole group: images of all ranks over the slowest rank's time
        "images_per_s": images / max(1e-9, seconds / ctx.world_size),
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "best_top1": state["best_top1"],
        "best_epoch": state["best_epoch"],
        "resumed_from_epoch": resumed_from,
        "skipped_images": skipped,
        "feature_cache": loaders.feature_cache,
        "early_stopped": stop,
        # peak resident memory of this worker process (Linux reports KiB)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eta_s": 0.0 if stop else seconds_per_epoch * (spec.epochs - done),
    }
    return metrics, stop or not math.isfinite(stats["train_loss"])


def _report(
    ctx: RunContext,
    metrics: dict[str, Any],
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    best: _BestWeights | None,
) -> float:
    """Report the epoch; with ``best`` (a checkpoint is due) rank 0 attaches the checkpoint
    (the others report metrics only). Returns the seconds the report held training up (the
    save, and whatever of the upload the report waits for)."""
    started = time.perf_counter()
    checkpoint = None
    if ctx.rank == 0 and best is not None:
        checkpoint = Path(tempfile.mkdtemp(prefix="refit-ckpt-"))
        try:
            save_checkpoint(
                checkpoint, model, optimizer, scheduler, state, best.beside(int(state["epoch"]))
            )
        except BaseException:
            shutil.rmtree(checkpoint, ignore_errors=True)
            raise
    ctx.report(metrics, checkpoint)  # the report owns the directory from here on
    return time.perf_counter() - started


def run_worker(inputs: RunInputs, ctx: RunContext) -> dict[str, Any]:
    """Scan, (cache features,) train, evaluate and checkpoint every epoch until done.

    Returns ``{"data_error": ...}`` when too many images are unreadable (no training then),
    else ``{"skipped_images": n, "timing": ...}``: when this worker started and ended (wall
    clock), its set-up (model, resume, data scan and loaders) and its checkpoint reports.
    """
    entered = time.time()
    spec = inputs.spec
    torch.manual_seed(spec.seed + ctx.rank)
    on_gpu = ctx.device.type == "cuda"
    precision = Precision(
        ctx.device, bf16=spec.bf16 if spec.bf16 is not None else on_gpu, channels_last=on_gpu
    )
    parts: dict[str, float] = {}  # where the set-up goes (the job's phase_details)
    lap = time.perf_counter()

    def part(name: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        parts[name] = round(now - lap, 3)
        lap = now

    model, plan = build_model(inputs)
    state, resumed_from = _resume(model, ctx)
    best = _BestWeights(state, ctx, model)
    part("setup_model_s")

    images = WorkerImages(inputs)
    stored = (
        StoredFeatures(model, images, ctx, precision)
        if plan.uses_feature_cache and inputs.training.feature_store_mb
        else None
    )
    part("setup_stored_features_s")
    bad = scan_unreadable(images, inputs, ctx, state, stored.known() if stored else frozenset())
    part("setup_scan_s")
    train_s = [s for s in inputs.train if s.key not in bad]
    val_s = [s for s in inputs.val if s.key not in bad]
    error = data_error(inputs, bad, train_s, val_s)
    if error:
        return {"data_error": error, "skipped_images": len(bad)}

    net: nn.Module = model.to(ctx.device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if plan.uses_feature_cache:
        loaders = feature_loaders(model, images, train_s, val_s, ctx, precision, stored)
    else:
        loaders = image_loaders(net, images, train_s, val_s, ctx)
    optimizer, scheduler = _optimizer(model, plan, spec, loaders.steps_per_epoch, ctx)
    part("setup_loaders_s")
    setup_s, report_s = time.time() - entered, 0.0

    interval = 0.0 if inputs.training.legacy_job_path else inputs.training.checkpoint_interval_s
    started = last_checkpoint = time.perf_counter()
    for epoch in range(int(state["epoch"]), spec.epochs):
        epoch_started = time.perf_counter()
        if isinstance(getattr(loaders.train, "sampler", None), DistributedSampler):
            loaders.train.sampler.set_epoch(epoch)
        set_frozen_batchnorm(model, plan, epoch)
        stats = train_one_epoch(
            loaders.trained,
            loaders.train,
            optimizer,
            scheduler,
            plan=plan,
            epoch=epoch,
            precision=precision,
            label_smoothing=spec.label_smoothing,
            on_step=_StepReporter(ctx, spec, epoch, loaders.steps_per_epoch),
        )
        with _val_outputs(model, inputs, ctx, loaders, precision, val_s) as outputs:
            val = evaluate(
                loaders.trained, loaders.val, num_classes=len(inputs.classes), precision=precision
            ).compute(inputs.classes)
        per_epoch = (time.perf_counter() - started) / max(1, epoch + 1 - resumed_from)
        metrics, stop = _epoch_metrics(
            spec=spec,
            state=state,
            stats=stats,
            val=val,
            loaders=loaders,
            ctx=ctx,
            seconds_per_epoch=per_epoch,
            resumed_from=resumed_from,
            skipped=len(bad),
        )
        # train + validation of this epoch alone: a job's fixed cost is its time beyond these
        metrics["epoch_s"] = state["history"][-1]["epoch_s"] = round(
            time.perf_counter() - epoch_started, 3
        )
        metrics["epochs_s"] = round(sum(h.get("epoch_s", 0.0) for h in state["history"]), 3)
        # this attempt's epochs alone (a resumed run's history has the earlier attempt's)
        metrics["attempt_epochs_s"] = round(
            sum(h.get("epoch_s", 0.0) for h in state["history"] if h["epoch"] > resumed_from), 3
        )
        best.offer(model, int(state["epoch"]), float(val["top1"]), outputs.done())
        # the last epoch's checkpoint hands the weights over, unless this process keeps them
        last = (stop or epoch + 1 == spec.epochs) and ctx.keep_best is None
        due = last or time.perf_counter() - last_checkpoint >= interval
        report_s += _report(ctx, metrics, model, optimizer, scheduler, state, best if due else None)
        if due:
            last_checkpoint = time.perf_counter()
        if stop:
            break
    if ctx.keep_best is not None and ctx.rank == 0:
        weights = best.weights if best.weights is not None else _copy(model)
        ctx.keep_best(weights, dict(state), best.outputs)
    timing = {
        "started_at": entered,
        "setup_s": round(setup_s, 3),
        "setup_parts": parts,
        "checkpoints_s": round(report_s, 3),
        "ended_at": time.time(),
    }
    return {"skipped_images": len(bad), "timing": timing}
