"""Statistics of a version's penultimate-layer features: the reference of the drift score.

At publish time the job records them from the candidate's own pass over the validation split
(held-out images of the training data: what unseen in-distribution inputs look like; the
training images' features are pulled toward their classes by training, which would make the
threshold too tight): the per-feature mean and standard deviation, and the distance within
which ``QUANTILE`` of those images lie. A live input's distance is the root mean square of its
standardised features (a diagonal Mahalanobis distance: one pass over the head's input, no
matrix); the drift score of a sample of live inputs is the share farther than that threshold,
about ``1 - QUANTILE`` while inputs look like the validation split, toward 1 as they move away.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from training.backbones import head_module
from training.storage.errors import IntegrityError
from training.storage.registry import DriftReference

FILE = "feature_stats.safetensors"
QUANTILE = 0.95
MIN_IMAGES = 10
"""Fewer validation images than this: no reference (a 95th percentile of fewer is noise)."""


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and spread of the reference images, and the outlier threshold."""

    mean: torch.Tensor
    std: torch.Tensor
    threshold: float

    @classmethod
    def fit(cls, features: torch.Tensor, quantile: float = QUANTILE) -> FeatureStats | None:
        """The statistics of ``features`` ``[N, D]``; None for fewer than ``MIN_IMAGES``."""
        if features.ndim != 2 or features.shape[0] < MIN_IMAGES:
            return None
        f = features.double()
        mean, std = f.mean(dim=0), f.std(dim=0)
        # a feature that never varied (a ReLU that stayed at zero) would make any live value
        # infinitely far: give it a floor of a hundredth of the typical spread
        std = std.clamp_min(max(float(std.mean()) * 0.01, 1e-6))
        stats = cls(mean.float(), std.float(), 0.0)
        threshold = float(torch.quantile(stats.distances(features).double(), quantile))
        return cls(stats.mean, stats.std, threshold)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of every row of ``features`` ``[N, D]`` from the reference."""
        z = (features.float().flatten(1) - self.mean) / self.std
        return z.pow(2).mean(dim=1).sqrt()

    def record(self, images: int) -> DriftReference:
        """What the manifest says of this file."""
        return DriftReference(
            file=FILE,
            images=images,
            features=int(self.mean.numel()),
            quantile=QUANTILE,
            threshold=self.threshold,
        )

    def to_bytes(self) -> bytes:
        """The safetensors file of the version (never a pickle)."""
        return st_save(
            {"mean": self.mean.contiguous(), "std": self.std.contiguous()},
            metadata={"threshold": repr(self.threshold)},
        )

    @classmethod
    def from_bytes(cls, blob: bytes, record: DriftReference) -> FeatureStats:
        """Read a version's file back; IntegrityError unless it holds what the manifest says."""
        try:
            tensors = st_load(blob)
            mean, std = tensors["mean"].float(), tensors["std"].float()
        except Exception as exc:  # verified bytes, yet no such safetensors file
            raise IntegrityError(f"{record.file} is not a feature statistics file: {exc}") from None
        d = record.features
        if mean.shape != (d,) or std.shape != (d,):
            raise IntegrityError(f"{record.file} does not hold {d} features")
        finite = bool(torch.isfinite(mean).all() and torch.isfinite(std).all())
        if not finite or bool((std <= 0).any()) or not math.isfinite(record.threshold):
            raise IntegrityError(f"{record.file} holds non-finite or zero statistics")
        return cls(mean, std, record.threshold)


@contextmanager
def collect_features(model: nn.Module, backbone: str) -> Iterator[list[torch.Tensor]]:
    """The head's input of every forward pass of ``model`` while inside: its penultimate
    features, collected by a hook (no second pass over the data)."""
    out: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple[Any, ...]) -> None:
        out.append(args[0].detach().flatten(1).float().cpu())

    handle = head_module(model, backbone).register_forward_pre_hook(keep)
    try:
        yield out
    finally:
        handle.remove()
