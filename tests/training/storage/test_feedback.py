"""Feedback on a real SeaweedFS: content-addressed images, the latest label winning, a split
fixed by the content hash, and a dataset where every class is in both splits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conftest import png_bytes
from training.storage.errors import IntegrityError, SpecError
from training.storage.feedback import (
    Feedback,
    FeedbackItem,
    content_hash,
    split_of,
    trainable_splits,
)
from training.storage.s3 import ObjectStore


def _item(data: bytes, label: str, model: str = "m") -> FeedbackItem:
    sha = content_hash(data)
    return FeedbackItem(
        model=model,
        sha256=sha,
        image="png",
        label=label,
        split=split_of(sha, 0.2),
        labelled_at=datetime.now(UTC),
    )


def test_split_is_a_function_of_the_content() -> None:
    shas = [content_hash(png_bytes(0, seed=i)) for i in range(2000)]
    val = sum(split_of(s, 0.2) == "val" for s in shas)
    assert 320 < val < 480
    assert [split_of(s, 0.2) for s in shas] == [split_of(s, 0.2) for s in shas]


def test_put_dedups_and_the_latest_label_wins(store: ObjectStore) -> None:
    fb = Feedback(store)
    data = png_bytes(1)
    assert fb.put(_item(data, "a"), data) is None
    previous = fb.put(_item(data, "b"), data)
    assert previous is not None
    assert previous.label == "a"
    assert [i.label for i in fb.items("m")] == ["b"]
    images = list(store.list("feedback/m/images/"))
    assert len(images) == 1
    with pytest.raises(IntegrityError):  # a record whose image is not the one it names
        fb.put(_item(data, "a"), png_bytes(2))


def test_damaged_records_are_skipped_in_a_snapshot(store: ObjectStore) -> None:
    fb = Feedback(store)
    for i in range(3):
        d = png_bytes(0, seed=i)
        fb.put(_item(d, "a"), d)
    store.put_bytes(f"feedback/m/labels/{'0' * 64}.json", b"{broken")
    assert len(fb.items("m")) == 3
    with pytest.raises(SpecError):
        fb.get("../m", "0" * 64)


def test_every_trained_class_is_in_both_splits() -> None:
    items = [_item(png_bytes(0, seed=i), "a") for i in range(3)]
    items += [_item(png_bytes(1, seed=i), "b") for i in range(20)]
    items.append(_item(png_bytes(2), "c"))
    out, skipped = trainable_splits(items)
    assert skipped == ["c"]
    for label in ("a", "b"):
        assert {i.split for i in out if i.label == label} == {"train", "val"}
    # a class that already has both keeps every image's own split
    b = {i.sha256: i.split for i in items if i.label == "b"}
    if set(b.values()) == {"train", "val"}:
        assert {i.sha256: i.split for i in out if i.label == "b"} == b
