"""Statistics of a version's penultimate-layer features: the reference of the drift score.

At publish time the job fits them on the candidate's features of a sample of its training
images (up to ``REFIT_TRAINING__DRIFT_FIT_IMAGES``: many more than a small validation split
has): the mean features of each class the model predicted and each feature's pooled spread
around them; and it sets the threshold, the distance within which ``QUANTILE`` of the images
lie, on the validation split, held out from the fit (what unseen in-distribution inputs look
like: a quantile measured on the images the means were fitted on, and on training images whose
features training pulled toward their classes, would be too tight). A
live input's distance is the root mean square of its standardised features' difference from
the nearest class mean (a class-conditional diagonal Mahalanobis distance, as in Lee et al.
2018's out-of-distribution detector, without the full covariance); the drift score of a
sample of live inputs is the share farther than that threshold,
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
    """Per predicted class the mean feature vector, the pooled within-class spread of each
    feature, and the outlier threshold."""

    centroids: torch.Tensor
    """``[classes seen, D]``: the mean features of the images predicted as each class."""
    std: torch.Tensor
    """``[D]``: each feature's spread around its image's class mean."""
    threshold: float
    images: int = 0
    """Images the means and spreads were fitted on."""
    held_out: int = 0
    """Images, not fitted on, the threshold was measured on."""

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        predicted: torch.Tensor,
        held_out: torch.Tensor | None = None,
        quantile: float = QUANTILE,
    ) -> FeatureStats | None:
        """The statistics of ``features`` ``[N, D]`` grouped by ``predicted`` ``[N]`` (the
        model's own top-1), the threshold measured on ``held_out`` ``[M, D]`` (unset, or
        fewer than ``MIN_IMAGES`` rows: every fourth row of ``features`` is held out instead);
        None for fewer than ``MIN_IMAGES`` to fit on or to measure on."""
        if held_out is None or held_out.shape[0] < MIN_IMAGES:
            if features.ndim != 2 or features.shape[0] < 2 * MIN_IMAGES:
                return None
            keep = torch.arange(features.shape[0]) % 4 != 3
            features, predicted, held_out = features[keep], predicted[keep], features[~keep]
        if features.ndim != 2 or features.shape[0] < MIN_IMAGES:
            return None
        f = features.double()
        classes = sorted(int(c) for c in predicted.unique())
        centroids = torch.stack([f[predicted == c].mean(dim=0) for c in classes])
        index = torch.tensor([classes.index(int(c)) for c in predicted])
        std = (f - centroids[index]).std(dim=0)
        # a feature that never varied (a ReLU that stayed at zero) would make any live value
        # infinitely far: give it a floor of a hundredth of the typical spread
        std = std.clamp_min(max(float(std.mean()) * 0.01, 1e-6))
        stats = cls(centroids.float(), std.float(), 0.0)
        threshold = float(torch.quantile(stats.distances(held_out).double(), quantile))
        return cls(stats.centroids, stats.std, threshold, len(f), int(held_out.shape[0]))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of every row of ``features`` ``[N, D]`` from its nearest class mean.

        Class means, not one mean of all: inputs unlike every class (an inverted image) tend
        to land between the classes, near the overall mean, where a single Gaussian would
        call them typical. Expanded as ``|f|^2 - 2 f.c + |c|^2`` (standardised): one matrix
        product, no ``[N, classes, D]`` tensor."""
        f = features.float().flatten(1) / self.std
        c = self.centroids / self.std
        d2 = f.pow(2).sum(1, keepdim=True) - 2 * f @ c.T + c.pow(2).sum(1)
        return (d2.clamp_min(0) / f.shape[1]).min(dim=1).values.sqrt()

    def record(self) -> DriftReference:
        """What the manifest says of this file."""
        return DriftReference(
            file=FILE,
            images=self.images,
            held_out=self.held_out,
            features=int(self.std.numel()),
            classes=int(self.centroids.shape[0]),
            quantile=QUANTILE,
            threshold=self.threshold,
        )

    def to_bytes(self) -> bytes:
        """The safetensors file of the version (never a pickle)."""
        return st_save(
            {"centroids": self.centroids.contiguous(), "std": self.std.contiguous()},
            metadata={"threshold": repr(self.threshold)},
        )

    @classmethod
    def from_bytes(cls, blob: bytes, record: DriftReference) -> FeatureStats:
        """Read a version's file back; IntegrityError unless it holds what the manifest says."""
        try:
            tensors = st_load(blob)
            centroids, std = tensors["centroids"].float(), tensors["std"].float()
        except Exception as exc:  # verified bytes, yet no such safetensors file
            raise IntegrityError(f"{record.file} is not a feature statistics file: {exc}") from None
        d = record.features
        if centroids.shape != (record.classes, d) or std.shape != (d,):
            raise IntegrityError(f"{record.file} does not hold {record.classes} x {d} features")
        finite = bool(torch.isfinite(centroids).all() and torch.isfinite(std).all())
        if not finite or bool((std <= 0).any()) or not math.isfinite(record.threshold):
            raise IntegrityError(f"{record.file} holds non-finite or zero statistics")
        return cls(centroids, std, record.threshold, record.images, record.held_out or 0)


@contextmanager
def collect_outputs(
    model: nn.Module, backbone: str
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(features, logits)`` of every forward pass of ``model`` while inside: the head's
    input (penultimate features) and output, collected by a hook (no second pass)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(_module: nn.Module, args: tuple[Any, ...], logits: torch.Tensor) -> None:
        out.append((args[0].detach().flatten(1).float().cpu(), logits.detach().float().cpu()))

    handle = head_module(model, backbone).register_forward_hook(keep)
    try:
        yield out
    finally:
        handle.remove()
