"""Preprocessing applied identically in training and serving: torchvision's transforms for
the :class:`~training.preprocessing_spec.Preprocessing` stored with every model."""

from __future__ import annotations

import functools
from typing import Any

import torch
from PIL import Image

from training.preprocessing_spec import Augmentation, Preprocessing
from training.tv import transforms_v2 as T  # noqa: N812 - torchvision convention

TF = T.functional


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


@functools.lru_cache(maxsize=64)
def crop_transform(p: Preprocessing) -> T.Compose:
    """PIL image -> uint8 tensor [3, crop, crop]: resize and crop, not yet normalised (one
    per preprocessing: serving asks for it on every request; the transforms hold no state)."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(p.resize_size, interpolation=_interp(p), antialias=True),
            T.CenterCrop(p.crop_size),
        ]
    )


def crop_image(p: Preprocessing, image: Image.Image) -> torch.Tensor:
    """:func:`crop_transform` of one image, through the torchvision kernels it dispatches to
    for a plain tensor (``pil_to_tensor``, ``resize_image``, ``center_crop_image``): the same
    bits (tested), without the v2 transforms' per-call dispatch (pytree flattening, type
    checks, size queries), which cost more than the resize itself on a 224-pixel image."""
    x = TF.pil_to_tensor(image)
    x = TF.resize_image(x, [p.resize_size], interpolation=_interp(p), antialias=True)
    return TF.center_crop_image(x, [p.crop_size, p.crop_size])


def normalize(p: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (from :func:`crop_transform`) -> normalised float32: scale, then
    subtract the mean and divide by the std, in place on one new tensor (the serving batch's
    only float copy; the same bits as out of place, without three temporaries)."""
    mean = torch.tensor(p.mean).view(1, 3, 1, 1)
    std = torch.tensor(p.std).view(1, 3, 1, 1)
    # a copy even of a float input: the in-place steps must never touch the caller's tensor
    x = images.to(torch.float32, copy=True)
    return x.div_(255.0).sub_(mean).div_(std)


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
