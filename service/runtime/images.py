"""Request images: capped, allow-listed, decoded with Pillow, errors naming the item."""

from __future__ import annotations

import torch

from service.request_errors import InvalidImageError, TooLargeError, UnsupportedImageError
from training.data import ImageDecodeError, decode_image
from training.preprocess import crop_image
from training.preprocessing_spec import Preprocessing


def decode_request_images(
    items: list[bytes],
    *,
    max_image_bytes: int,
    max_pixels: int,
    preprocessing: Preprocessing,
    max_side: int | None = None,
    max_aspect: float | None = None,
    field: str = "images",
) -> torch.Tensor:
    """Encoded images -> uint8 ``[N, 3, crop, crop]``. The byte cap is checked before
    decoding, the pixel, side and aspect caps before decoding the pixels (a large JPEG is
    decoded at the smallest scale that still covers the resize); the error names
    ``images[i]`` (``field``: another list's name)."""
    out = []
    for i, data in enumerate(items):
        item = f"{field}[{i}]"
        if len(data) > max_image_bytes:
            raise TooLargeError(f"{len(data)} bytes exceeds {max_image_bytes}", field=item)
        try:
            img = decode_image(
                data,
                max_pixels=max_pixels,
                max_side=max_side,
                max_aspect=max_aspect,
                draft_to=preprocessing.resize_size,
            )
        except ImageDecodeError as exc:
            cls = {"format": UnsupportedImageError, "pixels": TooLargeError}.get(
                exc.reason, InvalidImageError
            )
            raise cls(str(exc), field=item) from None
        out.append(crop_image(preprocessing, img))
    if not out:
        size = preprocessing.crop_size
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    if len(out) == 1:  # a view: the lane's batch is the one copy
        return out[0].unsqueeze(0)
    return torch.stack(out)
