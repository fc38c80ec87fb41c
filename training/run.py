"""One training run on one worker: Ray-free, driven through a :class:`RunContext`.

Ray Train's worker function (``trainer.py``) and the plain-torch benchmark both call
:func:`run_worker`; only the context differs (how to wrap the model for DDP, where metrics and
checkpoints go, which checkpoint to resume from).
"""

from __future__ import annotations

import json
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
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.backbones import build_backbone, head_module, trunk
from training.data import ByteCache, ImageDataset, Sample, make_loader
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
    extract_features,
    train_one_epoch,
)
from training.preprocess import Preprocessing, eval_transform, train_transform
from training.settings import RefitSettings
from training.spec import FinetuneSpec
from training.store import ObjectStore
from training.weights import load_base_weights

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.pt"
STATE_FILE = "state.json"


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
    """Everything the driver hands every worker (picklable)."""

    spec: FinetuneSpec
    settings: RefitSettings
    backbone: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    preprocessing: Preprocessing
    base_state: dict[str, torch.Tensor] | None = None
    keep_head: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


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


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]
) -> None:
    """Weights (safetensors), optimizer+scheduler (tensors and numbers only), and state."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / OPTIM_FILE,
    )
    (directory / STATE_FILE).write_text(json.dumps(state))


def load_checkpoint_state(directory: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    return state


def load_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (safetensors: no code runs on load)."""
    return load_file(directory / MODEL_FILE)


def run_worker(inputs: RunInputs, ctx: RunContext) -> dict[str, Any]:
    """Scan, (cache features,) train, evaluate and checkpoint every epoch until done.

    Returns ``{"data_error": ...}`` when too many images are unreadable (no training then),
    else ``{"skipped_images": n}``.
    """
    spec, tset = inputs.spec, inputs.settings.training
    torch.manual_seed(spec.seed + ctx.rank)
    store = ObjectStore(inputs.settings.s3)
    precision = Precision(
        ctx.device,
        bf16=spec.bf16 if spec.bf16 is not None else ctx.device.type == "cuda",
        channels_last=ctx.device.type == "cuda",
    )
    model, plan = build_model(inputs)
    state: dict[str, Any] = {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": []}
    resumed_from = 0
    if ctx.resume_from is not None:
        state = load_checkpoint_state(ctx.resume_from)
        model.load_state_dict(load_checkpoint_weights(ctx.resume_from))
        resumed_from = int(state["epoch"])

    cache = ByteCache(tset.cache_mb * 1024 * 1024)

    def dataset(samples: list[Sample], train: bool) -> ImageDataset:
        tf = train_transform(inputs.preprocessing, spec.augment) if train else None
        return ImageDataset(
            store,
            samples,
            tf or eval_transform(inputs.preprocessing),
            max_bytes=tset.max_image_bytes,
            max_pixels=tset.max_image_pixels,
            cache=cache,
        )

    # One scan finds unreadable images; every rank drops the same ones (shards stay equal).
    if "bad_keys" not in state:
        everything = dataset(inputs.train + inputs.val, train=False)
        mine = list(range(ctx.rank, len(everything), ctx.world_size))
        state["bad_keys"] = _gather_lists(everything.find_unreadable(mine))
    bad = set(state["bad_keys"])
    total = len(inputs.train) + len(inputs.val)
    limit = spec.max_corrupt_fraction
    limit = tset.max_corrupt_fraction if limit is None else limit
    train_s = [s for s in inputs.train if s.key not in bad]
    val_s = [s for s in inputs.val if s.key not in bad]
    if len(bad) > limit * total or not train_s or not val_s:
        return {
            "data_error": f"{len(bad)} of {total} images are unreadable "
            f"(limit {limit:.0%}); examples: {sorted(bad)[:3]}",
            "skipped_images": len(bad),
        }

    use_cache = plan.uses_feature_cache
    net: nn.Module = model.to(ctx.device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if use_cache:
        # Head only: the trunk runs once per image; epochs train the head on cached features.
        body = trunk(model, inputs.backbone)

        def features(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
            loader = make_loader(
                dataset(samples, False),
                batch_size=spec.batch_size,
                shuffle=False,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
            return extract_features(body, loader, precision=precision)

        feats_tr, feats_va = features(train_s), features(val_s)
        head = head_module(model, inputs.backbone)
        trained = ctx.wrap_model(head)
        train_ds = TensorDataset(*feats_tr)
        sampler: DistributedSampler[Any] | None = (
            DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, seed=spec.seed)
            if ctx.world_size > 1
            else None
        )
        train_loader: Any = DataLoader(
            train_ds, batch_size=spec.batch_size, shuffle=sampler is None, sampler=sampler
        )
        val_loader: Any = DataLoader(TensorDataset(*feats_va), batch_size=spec.batch_size)
        steps_per_epoch = len(train_loader)
    else:
        trained = ctx.wrap_model(net)
        train_loader = make_loader(
            dataset(train_s, True),
            batch_size=spec.batch_size,
            shuffle=True,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=spec.seed,
            num_workers=tset.loader_workers,
        )
        val_loader = make_loader(
            dataset(val_s, False),
            batch_size=spec.batch_size,
            shuffle=False,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        steps_per_epoch = len(train_loader)

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
        opt_state = torch.load(ctx.resume_from / OPTIM_FILE, weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])

    started = time.perf_counter()
    for epoch in range(int(state["epoch"]), spec.epochs):
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        set_frozen_batchnorm(model, plan, epoch)
        epoch_start = time.perf_counter()

        def on_step(step: int, images: int, epoch: int = epoch, t0: float = epoch_start) -> None:
            if ctx.on_step is not None:
                seconds = time.perf_counter() - t0
                ctx.on_step(
                    {
                        "epoch": epoch,
                        "epochs": spec.epochs,
                        "step": step,
                        "steps_per_epoch": steps_per_epoch,
                        # this rank's rate times the group size (shards are equal)
                        "images_per_s": images * ctx.world_size / max(1e-9, seconds),
                    }
                )

        stats = train_one_epoch(
            trained,
            train_loader,
            optimizer,
            scheduler,
            plan=plan,
            epoch=epoch,
            precision=precision,
            label_smoothing=spec.label_smoothing,
            on_step=on_step,
        )
        val = evaluate(
            trained, val_loader, num_classes=len(inputs.classes), precision=precision
        ).compute(inputs.classes)
        images, seconds = _sum([stats["train_images"], stats["train_seconds"]])
        done = epoch + 1
        elapsed = time.perf_counter() - started
        per_epoch = elapsed / max(1, done - resumed_from)
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
            "steps_per_epoch": steps_per_epoch,
            "train_loss": stats["train_loss"],
            # throughput of the whole group: images of all ranks over the slowest rank's time
            "images_per_s": images / max(1e-9, seconds / ctx.world_size),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "best_top1": state["best_top1"],
            "best_epoch": state["best_epoch"],
            "resumed_from_epoch": resumed_from,
            "skipped_images": len(bad),
            "feature_cache": use_cache,
            "early_stopped": stop,
            # peak resident memory of this worker process (Linux reports KiB)
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "eta_s": 0.0 if stop else per_epoch * (spec.epochs - done),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ctx.rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
                checkpoint = Path(tmp)
            ctx.report(metrics, checkpoint)
        if stop or not math.isfinite(stats["train_loss"]):
            break
    return {"skipped_images": len(bad)}
