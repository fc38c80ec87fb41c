"""Preprocessing: stored with every model, applied identically in training and serving."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.tv import transforms_v2 as T  # noqa: N812 - torchvision convention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocessing(BaseModel):
    """Resize the shorter side, center-crop, scale to [0, 1], normalise per channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize_size: int = Field(default=256, ge=8, le=1024)
    crop_size: int = Field(default=224, ge=8, le=1024)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.crop_size > self.resize_size:
            raise ValueError("crop_size must not exceed resize_size")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    @classmethod
    def from_torchvision(cls, weights_transforms: Any) -> Preprocessing:
        """From a torchvision weights enum's ``transforms()`` (ImageClassification)."""
        t = weights_transforms
        return cls(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=str(t.interpolation.value),
        )


class Augmentation(BaseModel):
    """Training-time augmentation: random resized crop and horizontal flip."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = True
    min_scale: float = Field(default=0.5, gt=0, le=1)
    """Smallest crop area (fraction of the image) for RandomResizedCrop."""
    hflip: bool = True
    """Random horizontal flips (turn off for text, digits and other chiral data)."""


def _interp(p: Preprocessing) -> T.InterpolationMode:
    return T.InterpolationMode(p.interpolation)


def eval_transform(p: Preprocessing) -> T.Compose:
    """PIL image -> normalised float tensor [3, crop, crop] (validation and serving)."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(p.resize_size, interpolation=_interp(p), antialias=True),
            T.CenterCrop(p.crop_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(p.mean), list(p.std)),
        ]
    )


def crop_transform(p: Preprocessing) -> T.Compose:
    """PIL image -> uint8 tensor [3, crop, crop]: resize and crop, not yet normalised."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(p.resize_size, interpolation=_interp(p), antialias=True),
            T.CenterCrop(p.crop_size),
        ]
    )


def normalize(p: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (from :func:`crop_transform`) -> normalised float32."""
    mean = torch.tensor(p.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def train_transform(p: Preprocessing, aug: Augmentation) -> T.Compose:
    """PIL image -> augmented normalised float tensor [3, crop, crop]."""
    if not aug.enabled:
        return eval_transform(p)
    steps: list[Any] = [
        T.PILToTensor(),
        T.RandomResizedCrop(
            p.crop_size, scale=(aug.min_scale, 1.0), interpolation=_interp(p), antialias=True
        ),
    ]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(p.mean), list(p.std))]
    return T.Compose(steps)
