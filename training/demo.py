"""Offline demo data and jobs: scikit-learn's digits (real scans, shipped with the package).

Source task: digits 0-4 (all labels) -> a pretrained ``digits-base``. Target task: digits 5-9
with few labels per class, fine-tuned from that base. Images are upscaled 8x8 scans as PNGs in
ImageFolder layout; the target also gets a ``test/`` split the jobs never see.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from training.preprocessing_spec import Augmentation, Preprocessing
from training.storage.s3 import ObjectStore

SOURCE = "digits-0to4"
TARGET = "digits-5to9"
BASE_MODEL = "digits-base"
# Small images keep CPU training fast; digits are chiral, so no flips.
PREPROCESSING = Preprocessing(
    resize_size=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
AUGMENT = Augmentation(min_scale=0.7, hflip=False)


def digit_png(pixels: np.ndarray, size: int, *, invert: bool = False) -> bytes:
    """One 8x8 scan (values 0-16) as a ``size`` px PNG; ``invert``: light on dark swapped
    (the same digits rendered differently: the demo's shifted input distribution)."""
    grey = pixels * (255.0 / 16.0)
    img = Image.fromarray((255.0 - grey if invert else grey).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.resize((size, size), Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def write_digits(
    store: ObjectStore,
    name: str,
    digits: list[int],
    *,
    train_per_class: int | None,
    val_per_class: int,
    size: int = 32,
    seed: int = 0,
) -> dict[str, int]:
    """Write one ImageFolder dataset (``train/``, ``val/``, ``test/``) and return counts.

    ``train_per_class=None`` puts every image not in val into train (no test split).
    Idempotent: an existing dataset (its ``_SUCCESS`` marker) is left alone.
    """
    from sklearn.datasets import load_digits

    marker = f"datasets/{name}/_SUCCESS"
    if store.exists(marker):
        return {}
    bunch = load_digits()
    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {"train": 0, "val": 0, "test": 0}
    for d in digits:
        idx = rng.permutation(np.flatnonzero(bunch.target == d))
        val, rest = idx[:val_per_class], idx[val_per_class:]
        train = rest if train_per_class is None else rest[:train_per_class]
        test = rest[len(train) :]
        for split, ids in (("train", train), ("val", val), ("test", test)):
            for i in ids:
                jobs.append(
                    (
                        f"datasets/{name}/{split}/{d}/{int(i):04d}.png",
                        digit_png(bunch.images[i], size),
                    )
                )
            counts[split] += len(ids)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put_bytes(kv[0], kv[1], content_type="image/png"), jobs))
    store.put_bytes(marker, b"")
    return counts


def base_spec(store: ObjectStore, *, epochs: int = 6) -> dict[str, Any]:
    """Spec of the source-task job that makes the pretrained base (from scratch)."""
    return {
        "model": BASE_MODEL,
        "base": {"backbone": "resnet18", "weights": None},
        "dataset": store.uri(f"datasets/{SOURCE}/"),
        "freeze": {"policy": "full"},
        "epochs": epochs,
        "batch_size": 32,
        "lr": 0.002,
        "workers": 1,
        "preprocess": PREPROCESSING.model_dump(),
        "augment": AUGMENT.model_dump(),
        "label_smoothing": 0.05,
    }


def target_spec(
    store: ObjectStore, *, policy: dict[str, Any] | None = None, epochs: int = 8, workers: int = 1
) -> dict[str, Any]:
    """Spec of the target-task fine-tune from the published base."""
    return {
        "model": TARGET,
        "base": {"version": f"{BASE_MODEL}@production"},
        "dataset": store.uri(f"datasets/{TARGET}/"),
        # benchmarks/transfer.py: the best policy from this base (its last-layer features are
        # specialised to 5 source classes; a head-only probe on them trails random features)
        "freeze": policy or {"policy": "last_n_stages", "n": 2},
        "epochs": epochs,
        "batch_size": 16,
        "lr": 0.003,
        "workers": workers,
        "augment": AUGMENT.model_dump(),
        "label_smoothing": 0.05,
    }


def write_demo_datasets(store: ObjectStore, *, few: int = 20) -> None:
    """Both demo datasets: source with all labels, target with ``few`` labels per class."""
    write_digits(store, SOURCE, [0, 1, 2, 3, 4], train_per_class=None, val_per_class=30)
    write_digits(store, TARGET, [5, 6, 7, 8, 9], train_per_class=few, val_per_class=30)
