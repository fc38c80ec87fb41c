"""What a training run is given: :class:`RunInputs` from the driver (the same for every
worker, picklable) and :class:`RunContext` from where it runs (rank, device, how to wrap the
model for DDP, where reports and checkpoints go)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.data import Sample
from training.job_settings import TrainingSettings
from training.preprocessing_spec import Preprocessing
from training.spec import FinetuneSpec
from training.storage.location import S3Settings


@dataclass
class RunContext:
    """What a run needs from where it runs."""

    rank: int
    world_size: int
    device: torch.device
    wrap_model: Callable[[nn.Module], nn.Module]
    report: Callable[[dict[str, Any], Path | None], None]
    """Called after every epoch with its metrics and (rank 0) a checkpoint directory, which
    it takes over: it removes the directory once it is done with it."""
    resume_from: Path | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    """Called after every optimizer step on this rank with epoch, step and images/s."""
    keep_best: (
        Callable[[dict[str, torch.Tensor], dict[str, Any], ValOutputs | None], None] | None
    ) = None
    """Set where the run's own process publishes (the in-process path): rank 0 hands it the
    best epoch's weights, the run's state and (when that epoch ran in this attempt, in fp32)
    its validation outputs at the end, and the last epoch then needs no checkpoint of its own
    (a failure after it repeats at most ``checkpoint_interval_s``)."""


@dataclass
class ValOutputs:
    """The best epoch's validation pass, image by image (in the order of ``keys``): the
    head's input (penultimate features) and its logits. The publishing process scores the
    candidate and measures its drift threshold on them instead of a second pass."""

    keys: list[str]
    features: torch.Tensor
    logits: torch.Tensor


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
class FitResult:
    """What a finished run left: the best epoch's weights (None: nothing trained, e.g. a
    data error), that epoch's number and top-1, where its checkpoints are, the last report's
    metrics with what rank 0 returned, and the run's state (``bad_keys``: unreadable images)."""

    metrics: dict[str, Any]
    best_weights: dict[str, torch.Tensor] | None
    best_metrics: dict[str, Any]
    storage_uri: str
    state: dict[str, Any] = field(default_factory=dict)
    val_outputs: ValOutputs | None = None
    """The best epoch's validation outputs, where the run kept them (see
    :class:`ValOutputs`)."""
