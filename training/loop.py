"""The training loop in plain torch: runs with or without Ray, on CPU or CUDA.

``train_one_epoch`` and ``evaluate`` take any iterable of ``(inputs, targets)`` batches and a
model (possibly DDP-wrapped); nothing here knows about Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.classification_metrics import MetricAccumulator
from training.freeze import FreezePlan, drop_frozen_grads


@dataclass(frozen=True)
class Precision:
    """Numeric mode of a run: bf16 autocast and channels_last (both for GPUs by default)."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False

    def autocast(self) -> Any:
        """The autocast context for forward passes."""
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch (images get channels_last when enabled)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def build_optimizer(
    groups: list[dict], *, name: str, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    plan: FreezePlan,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, per step, times each stage's policy factor for the
    epoch (0 while a stage is frozen by a phase, ``decay**k`` for layer decay, ...)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(steps_per_epoch * warmup_epochs)

    def curve(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def for_stage(stage: int) -> Callable[[int], float]:
        return lambda step: curve(step) * plan.stage_factor(stage, step // max(1, steps_per_epoch))

    lambdas = [for_stage(g["stage"]) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambdas)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    plan: FreezePlan,
    epoch: int,
    precision: Precision,
    label_smoothing: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``. Returns loss, images, seconds and images/s of this process.

    ``on_step(step, images)`` is called after every optimizer step (progress reporting).
    """
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    loss_sum, images, steps = 0.0, 0, 0
    start = time.perf_counter()
    for x, y in batches:
        if x.shape[0] < 2:
            continue  # BatchNorm cannot train on one sample; equal on every rank (padded shards)
        x, y = precision.to_device(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        drop_frozen_grads(optimizer.param_groups, plan, epoch)
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * x.shape[0]
        images += x.shape[0]
        steps += 1
        if on_step is not None:
            on_step(steps, images)
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(1, images),
        "train_images": float(images),
        "train_seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "steps": float(steps),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    precision: Precision,
) -> MetricAccumulator:
    """Metrics over ``batches``, summed across ranks when distributed."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    acc = MetricAccumulator(num_classes)
    for x, y in batches:
        x, y = precision.to_device(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        acc.update(logits.float(), y, float(criterion(logits.float(), y)))
    acc.all_reduce()
    return acc


@torch.no_grad()
def extract_features(
    trunk: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen trunk once over ``batches``: the head-only feature cache."""
    trunk.eval()
    feats, labels = [], []
    for x, y in batches:
        with precision.autocast():
            feats.append(trunk(precision.to_device(x)).float().cpu())
        labels.append(y)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
