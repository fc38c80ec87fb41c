"""A served model version and the slot that swaps versions between batches.

Loading is off the request path: verify every sha256 (the registry does), build, load weights
strictly, warm up, and check the numeric mode against fp32 on the version's calibration images.
A mode that does not keep top-1 agreement >= ``min_agreement`` falls back to fp32.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from training.backbones import build_backbone
from training.errors import IntegrityError
from training.preprocess import Preprocessing, normalize
from training.registry import Manifest, Registry

NumericMode = Literal["fp32", "channels_last", "bf16"]


@dataclass
class ServedModel:
    """One loaded, verified, warmed-up version."""

    manifest: Manifest
    module: nn.Module
    mode: NumericMode
    agreement: float | None = None
    """Top-1 agreement of ``mode`` with fp32 on the calibration images (None: not checked)."""
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        """Model name."""
        return self.manifest.model

    @property
    def version(self) -> str:
        """Version id."""
        return self.manifest.version

    @property
    def preprocessing(self) -> Preprocessing:
        """How request images are resized, cropped and normalised."""
        return self.manifest.preprocessing

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 crops ``[N, 3, H, W]`` -> float32 logits ``[N, classes]``."""
        return forward(self.module, normalize(self.preprocessing, images), self.mode)

    @torch.inference_mode()
    def logits_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Already preprocessed float32 ``[N, 3, H, W]`` -> float32 logits."""
        return forward(self.module, x, self.mode)

    def top_k(self, images: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-k labels and probabilities per image (uint8 crops)."""
        return self.rank(self.logits(images), k)

    def rank(self, logits: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-k labels and probabilities from logits."""
        probs = logits.softmax(dim=1)
        k = min(k, probs.shape[1])
        scores, idx = probs.topk(k, dim=1)
        names = self.manifest.class_names
        return [
            [
                {"label": names[j], "score": round(float(s), 6)}
                for s, j in zip(row_s, row_i, strict=True)
            ]
            for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]


def forward(module: nn.Module, x: torch.Tensor, mode: NumericMode) -> torch.Tensor:
    """Logits of normalised ``x`` in a numeric mode (the module already in its memory format)."""
    if mode in ("channels_last", "bf16"):
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else nullcontext()
    with ctx:
        return module(x).float()


def _memory_format(module: nn.Module, fmt: torch.memory_format) -> nn.Module:
    out: nn.Module = module.to(memory_format=fmt)  # type: ignore[call-overload]  # stubs lack it
    return out


def _build_with(backbone: str, num_classes: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The module with ``state`` loaded. Built on the meta device and filled by assignment
    where the builder allows it: no random init that the weights overwrite anyway (the
    slowest step of a hot-load on a busy CPU)."""
    try:
        with torch.device("meta"):
            module = build_backbone(backbone, num_classes=num_classes)
        module.load_state_dict(state, strict=True, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module
    except NotImplementedError:  # a builder that computes with tensors (regnet)
        pass
    module = build_backbone(backbone, num_classes=num_classes)
    module.load_state_dict(state, strict=True)
    return module


def load_served_model(
    registry: Registry,
    name: str,
    ref: str,
    *,
    mode: NumericMode = "fp32",
    min_agreement: float = 0.99,
) -> ServedModel:
    """Load, verify, warm up and mode-check one version (by id or alias)."""
    manifest, state = registry.load(name, ref)
    module = _build_with(manifest.backbone, manifest.num_classes, state)
    module.eval()
    calibration = registry.load_calibration(manifest)
    if calibration is None:
        size = manifest.preprocessing.crop_size
        calibration = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    x = normalize(manifest.preprocessing, calibration)
    agreement = None
    with torch.inference_mode():
        if mode != "fp32":
            reference = forward(module, x, "fp32").argmax(dim=1)
            module = _memory_format(module, torch.channels_last)
            candidate = forward(module, x, mode).argmax(dim=1)
            agreement = float((candidate == reference).float().mean())
            if agreement < min_agreement:
                module = _memory_format(module, torch.contiguous_format)
                mode = "fp32"
        # warm-up in the final mode, and a sanity check: a version that yields NaN or inf
        # never goes live (the old one keeps serving)
        if not torch.isfinite(forward(module, x[:4], mode)).all():
            raise IntegrityError(f"{name} {manifest.version} produces non-finite logits")
    return ServedModel(manifest=manifest, module=module, mode=mode, agreement=agreement)


class ModelSlot:
    """The current version of one model. A batch takes the reference once (``current``) and
    finishes on it; ``swap`` replaces it atomically, so no batch ever mixes versions and the
    old model is freed once its last batch returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: ServedModel | None = None
        self.swaps = 0

    @property
    def current(self) -> ServedModel | None:
        """The model to run the next batch on."""
        return self._model

    def swap(self, new: ServedModel) -> ServedModel | None:
        """Install a loaded model; returns the one it replaced."""
        with self._lock:
            old, self._model = self._model, new
            self.swaps += 1
            return old
