"""One training run on one worker: Ray-free, driven through a :class:`RunContext`.

Ray Train's worker function (``ray_train.py``) and the plain-torch benchmarks both call
:func:`run_worker`; only the context differs (how to wrap the model for DDP, where metrics and
checkpoints go, which checkpoint to resume from). The run, step by step:

1. build the model with its base weights and the freeze plan; resume from a checkpoint;
2. scan the images once: every rank drops the same unreadable ones (shards stay equal);
3. build the loaders: cached backbone features (head only) or images;
4. train epoch by epoch, evaluating and checkpointing after each.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.backbones import build_backbone, head_module, trunk
from training.checkpoints import (
    load_checkpoint_state,
    load_checkpoint_weights,
    load_optimizer_state,
    save_checkpoint,
)
from training.data import ByteCache, ImageDataset, Sample, make_loader
from training.freeze import (
    FreezePlan,
    apply_freeze,
    param_groups,
    plan_freeze,
    set_frozen_batchnorm,
)
from training.job_settings import TrainingSettings
from training.loop import (
    Precision,
    build_optimizer,
    build_scheduler,
    evaluate,
    extract_features,
    train_one_epoch,
)
from training.preprocess import Preprocessing, eval_transform, train_transform
from training.spec import FinetuneSpec
from training.storage.location import S3Settings
from training.storage.s3 import ObjectStore
from training.weights import load_base_weights


@dataclass
class RunContext:
    """What a run needs from where it runs."""

    rank: int
    world_size: int
    device: torch.device
    wrap_model: Callable[[nn.Module], nn.Module]
    report: Callable[[dict[str, Any], Path | None], None]
    resume_from: Path | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    """Called after every optimizer step on this rank with epoch, step and images/s."""


@dataclass
class RunInputs:
    """Everything the driver hands every worker (picklable). Only the settings sections a
    worker uses travel: the store's location and the training limits, never API tokens."""

    spec: FinetuneSpec
    s3: S3Settings
    training: TrainingSettings
    backbone: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    preprocessing: Preprocessing
    base_state: dict[str, torch.Tensor] | None = None
    keep_head: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Loaders:
    """What the epochs run on: the module that trains (the head alone on cached features)
    and its loaders."""

    trained: nn.Module
    train: Any
    val: Any
    steps_per_epoch: int
    feature_cache: bool


def _gather_lists(items: list[str]) -> list[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return sorted(items)
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return sorted(k for p in parts for k in (p or []))


def _sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def build_model(inputs: RunInputs) -> tuple[nn.Module, FreezePlan]:
    """The model with base weights loaded and the freeze policy applied."""
    model = build_backbone(inputs.backbone, num_classes=len(inputs.classes))
    if inputs.base_state is not None:
        load_base_weights(model, inputs.backbone, inputs.base_state, keep_head=inputs.keep_head)
    plan = plan_freeze(inputs.spec.freeze, model, inputs.backbone)
    apply_freeze(model, plan)
    return model, plan


class _Images:
    """Datasets of this worker's samples, sharing one in-memory byte cache across epochs."""

    def __init__(self, inputs: RunInputs) -> None:
        self.inputs = inputs
        self.store = ObjectStore(inputs.s3)
        self.cache = ByteCache(inputs.training.cache_mb * 1024 * 1024)

    def dataset(self, samples: list[Sample], *, train: bool) -> ImageDataset:
        pre, spec = self.inputs.preprocessing, self.inputs.spec
        transform = train_transform(pre, spec.augment) if train else eval_transform(pre)
        return ImageDataset(
            self.store,
            samples,
            transform,
            max_bytes=self.inputs.training.max_image_bytes,
            max_pixels=self.inputs.training.max_image_pixels,
            cache=self.cache,
        )


def _resume(model: nn.Module, ctx: RunContext) -> tuple[dict[str, Any], int]:
    """The run's state (epoch, best score, history) and the epoch it resumed from."""
    if ctx.resume_from is None:
        return {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": []}, 0
    state = load_checkpoint_state(ctx.resume_from)
    model.load_state_dict(load_checkpoint_weights(ctx.resume_from))
    return state, int(state["epoch"])


def _scan_unreadable(
    images: _Images, inputs: RunInputs, ctx: RunContext, state: dict[str, Any]
) -> set[str]:
    """Keys of unreadable images: found once (each rank scans its share), kept in the state
    so a resumed run drops exactly the same ones."""
    if "bad_keys" not in state:
        everything = images.dataset(inputs.train + inputs.val, train=False)
        mine = list(range(ctx.rank, len(everything), ctx.world_size))
        state["bad_keys"] = _gather_lists(everything.find_unreadable(mine))
    return set(state["bad_keys"])


def _data_error(inputs: RunInputs, bad: set[str], train: list[Sample], val: list[Sample]) -> str:
    """Why the data cannot be trained on, or ``""``."""
    total = len(inputs.train) + len(inputs.val)
    limit = inputs.spec.max_corrupt_fraction
    limit = inputs.training.max_corrupt_fraction if limit is None else limit
    if len(bad) > limit * total or not train or not val:
        return (
            f"{len(bad)} of {total} images are unreadable (limit {limit:.0%}); "
            f"examples: {sorted(bad)[:3]}"
        )
    return ""


def _feature_loaders(
    model: nn.Module,
    images: _Images,
    train: list[Sample],
    val: list[Sample],
    ctx: RunContext,
    precision: Precision,
) -> _Loaders:
    """Head only: the trunk runs once per image; the epochs train the head on its features."""
    spec, backbone = images.inputs.spec, images.inputs.backbone
    body = trunk(model, backbone)

    def features(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(
            images.dataset(samples, train=False),
            batch_size=spec.batch_size,
            shuffle=False,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        return extract_features(body, loader, precision=precision)

    feats_tr, feats_va = features(train), features(val)
    train_ds = TensorDataset(*feats_tr)
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, seed=spec.seed)
        if ctx.world_size > 1
        else None
    )
    train_loader = DataLoader(
        train_ds, batch_size=spec.batch_size, shuffle=sampler is None, sampler=sampler
    )
    return _Loaders(
        trained=ctx.wrap_model(head_module(model, backbone)),
        train=train_loader,
        val=DataLoader(TensorDataset(*feats_va), batch_size=spec.batch_size),
        steps_per_epoch=len(train_loader),
        feature_cache=True,
    )


def _image_loaders(
    net: nn.Module, images: _Images, train: list[Sample], val: list[Sample], ctx: RunContext
) -> _Loaders:
    """Every other policy: the whole (DDP-wrapped) model trains on decoded images."""
    spec = images.inputs.spec
    train_loader = make_loader(
        images.dataset(train, train=True),
        batch_size=spec.batch_size,
        shuffle=True,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=spec.seed,
        num_workers=images.inputs.training.loader_workers,
    )
    val_loader = make_loader(
        images.dataset(val, train=False),
        batch_size=spec.batch_size,
        shuffle=False,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    return _Loaders(ctx.wrap_model(net), train_loader, val_loader, len(train_loader), False)


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
    loaders: _Loaders,
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
) -> None:
    """Report the epoch; rank 0 attaches the checkpoint (the others report metrics only)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.rank == 0:
            save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
            checkpoint = Path(tmp)
        ctx.report(metrics, checkpoint)


def run_worker(inputs: RunInputs, ctx: RunContext) -> dict[str, Any]:
    """Scan, (cache features,) train, evaluate and checkpoint every epoch until done.

    Returns ``{"data_error": ...}`` when too many images are unreadable (no training then),
    else ``{"skipped_images": n}``.
    """
    spec = inputs.spec
    torch.manual_seed(spec.seed + ctx.rank)
    on_gpu = ctx.device.type == "cuda"
    precision = Precision(
        ctx.device, bf16=spec.bf16 if spec.bf16 is not None else on_gpu, channels_last=on_gpu
    )
    model, plan = build_model(inputs)
    state, resumed_from = _resume(model, ctx)

    images = _Images(inputs)
    bad = _scan_unreadable(images, inputs, ctx, state)
    train_s = [s for s in inputs.train if s.key not in bad]
    val_s = [s for s in inputs.val if s.key not in bad]
    error = _data_error(inputs, bad, train_s, val_s)
    if error:
        return {"data_error": error, "skipped_images": len(bad)}

    net: nn.Module = model.to(ctx.device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if plan.uses_feature_cache:
        loaders = _feature_loaders(model, images, train_s, val_s, ctx, precision)
    else:
        loaders = _image_loaders(net, images, train_s, val_s, ctx)
    optimizer, scheduler = _optimizer(model, plan, spec, loaders.steps_per_epoch, ctx)

    started = time.perf_counter()
    for epoch in range(int(state["epoch"]), spec.epochs):
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
        _report(ctx, metrics, model, optimizer, scheduler, state)
        if stop:
            break
    return {"skipped_images": len(bad)}
