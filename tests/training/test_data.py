"""Dataset indexing, splits, corrupt images and the data errors."""

from __future__ import annotations

import pytest
import torch

from conftest import png_bytes, write_imagefolder
from training.data import ImageDataset, decode_image, index_dataset
from training.preprocess import eval_transform
from training.preprocessing_spec import Preprocessing
from training.storage.errors import DataError
from training.storage.s3 import ObjectStore


def test_imagefolder_with_splits(store: ObjectStore) -> None:
    uri = write_imagefolder(store, "ds", classes=3, train=4, val=2)
    idx = index_dataset(store, uri)
    assert idx.classes == ["c0", "c1", "c2"]
    assert idx.split == "given"
    assert len(idx.train) == 12
    assert len(idx.val) == 6
    assert idx.fingerprint == index_dataset(store, uri).fingerprint


def test_stratified_split_is_deterministic(store: ObjectStore) -> None:
    uri = write_imagefolder(store, "flat", classes=2, train=10, val=0, splits=False)
    a = index_dataset(store, uri, val_fraction=0.2, seed=1)
    b = index_dataset(store, uri, val_fraction=0.2, seed=1)
    assert a.split == "stratified"
    assert a.val == b.val
    assert sorted(s.label for s in a.val) == [0, 0, 1, 1]
    assert not {s.key for s in a.val} & {s.key for s in a.train}


def test_jsonl_manifest(store: ObjectStore) -> None:
    lines = []
    for c in range(2):
        for i in range(3):
            key = f"raw/{c}-{i}.png"
            store.put_bytes(key, png_bytes(c, seed=i))
            lines.append(f'{{"uri": "{store.uri(key)}", "label": "k{c}"}}')
    store.put_bytes("datasets/m.jsonl", "\n".join(lines).encode())
    idx = index_dataset(store, store.uri("datasets/m.jsonl"))
    assert idx.layout == "jsonl"
    assert idx.classes == ["k0", "k1"]
    store.put_bytes("datasets/bad.jsonl", b'{"uri": "s3://elsewhere/x.png", "label": "a"}')
    with pytest.raises(Exception) as err:
        index_dataset(store, store.uri("datasets/bad.jsonl"))
    assert err.value.field == "dataset line 1"


def test_data_errors(store: ObjectStore) -> None:
    with pytest.raises(DataError, match="no images"):
        index_dataset(store, store.uri("datasets/nothing/"))
    write_imagefolder(store, "one", classes=1, train=3, val=1)
    with pytest.raises(DataError, match="at least 2 classes"):
        index_dataset(store, store.uri("datasets/one/"))
    write_imagefolder(store, "mismatch", classes=2, train=3, val=1)
    store.put_bytes("datasets/mismatch/val/c9/0.png", png_bytes(1))
    with pytest.raises(DataError, match="different classes") as err:
        index_dataset(store, store.uri("datasets/mismatch/"))
    assert err.value.field == "dataset"


def test_corrupt_images_found(store: ObjectStore) -> None:
    uri = write_imagefolder(store, "bad", classes=2, train=4, val=1, corrupt=2)
    idx = index_dataset(store, uri)
    ds = ImageDataset(store, idx.train, eval_transform(Preprocessing(resize_size=32, crop_size=32)))
    bad = ds.find_unreadable(range(len(ds)))
    assert len(bad) == 4
    x, _y = ds[len(ds) - 1]
    assert tuple(x.shape) == (3, 32, 32)


def test_decode_refuses_bombs_and_garbage() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        decode_image(png_bytes(1, size=64), max_pixels=100)
    with pytest.raises(ValueError):
        decode_image(b"GIF89a....", max_pixels=10**6)
    with pytest.raises(ValueError):
        decode_image(png_bytes(1)[:60], max_pixels=10**6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_serving_crop_is_the_transform_bit_for_bit(interpolation: str) -> None:
    """Serving crops through torchvision's kernels directly (``crop_image``); training and
    calibration through the v2 Compose (``crop_transform``): the same bits for upscaled,
    downscaled, wide, tall and odd-sized images, RGB and converted from other modes."""
    import io

    import numpy as np
    from PIL import Image

    from training.preprocess import crop_image, crop_transform

    rng = np.random.default_rng(0)
    sizes = [(224, 224), (8, 8), (640, 480), (300, 1000), (257, 255), (1001, 333)]
    for resize, crop in [(256, 224), (32, 32), (73, 61)]:
        pre = Preprocessing(resize_size=resize, crop_size=crop, interpolation=interpolation)
        compose = crop_transform(pre)
        for w, h in sizes:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for mode, fmt in [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")]:
                buf = io.BytesIO()
                Image.fromarray(pixels).convert(mode).save(buf, fmt)
                img = decode_image(buf.getvalue(), max_pixels=10**7)
                assert img.mode == "RGB"
                want = compose(img)
                got = crop_image(pre, img)
                assert got.dtype == want.dtype == torch.uint8
                assert got.shape == want.shape == (3, crop, crop)
                assert torch.equal(got, want), (interpolation, resize, crop, w, h, mode)
