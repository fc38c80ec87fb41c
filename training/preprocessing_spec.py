"""What a model's preprocessing is (stored in its manifest) and how training augments:
pydantic only, so the registry and every reader of manifests import no torch or torchvision
(the transforms that apply it are in :mod:`training.preprocess`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
