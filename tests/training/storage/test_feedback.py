"""Feedback on a real SeaweedFS: content-addressed images, the latest label winning, a split
fixed by the content hash, and a dataset where every class is in both splits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conftest import png_bytes
from training.storage.errors import IntegrityError, SpecError
from training.storage.feedback import (
    Feedback,
    FeedbackItem,
    content_hash,
    judgements,
    replaced_judgement,
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
    assert fb.put(_item(data, "a"), data)[1] is None
    stored, previous = fb.put(_item(data, "b"), data)
    assert previous is not None
    assert previous.label == "a"
    assert [j.label for j in stored.history] == ["a"]
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


def _judged(data: bytes, label: str, pid: str, version: str, predicted: str, at: datetime):
    return _item(data, label).model_copy(
        update={
            "prediction_id": pid,
            "index": 0,
            "predicted": predicted,
            "predicted_score": 0.9,
            "version": version,
            "labelled_at": at,
        }
    )


def test_relabels_keep_every_judgement_and_count_once(store: ObjectStore) -> None:
    """An image judged on v1's answer, then on v2's: both judgements stay (the record keeps
    its history); the same label again is not a new label (``label_since`` stays); a label
    on the same prediction corrects that judgement."""
    fb = Feedback(store)
    data = png_bytes(3)
    t0 = datetime(2026, 12, 6, 10, tzinfo=UTC)
    fb.put(_judged(data, "a", "p1", "v1", "b", t0), data)
    second, _ = fb.put(_judged(data, "a", "p2", "v2", "a", t0 + timedelta(minutes=1)), data)
    assert second.label_since == t0  # the same label: not new evidence for every_n_labels
    assert [(j.version, j.label, j.predicted) for j in judgements(fb.items("m"))] == [
        ("v1", "a", "b"),
        ("v2", "a", "a"),
    ]
    third, previous = fb.put(_judged(data, "c", "p2", "v2", "a", t0 + timedelta(minutes=2)), data)
    assert third.label_since == t0 + timedelta(minutes=2)  # a changed label counts again
    assert replaced_judgement(third, previous) == previous.judgement()  # p2 corrected
    assert [(j.version, j.label) for j in judgements(fb.items("m"))] == [("v1", "a"), ("v2", "c")]


def test_an_image_lent_to_the_other_split_stays_there(store: ObjectStore) -> None:
    """A class whose images all hash into train lends one to val; once a val image of its
    own arrives, the lent one stays in val: it validated a version, it is never trained on."""
    fb = Feedback(store)
    train = [
        d
        for d in (png_bytes(0, seed=i) for i in range(40))
        if split_of(content_hash(d), 0.2) == "train"
    ]
    val = [
        d
        for d in (png_bytes(0, seed=i) for i in range(40, 200))
        if split_of(content_hash(d), 0.2) == "val"
    ]
    for d in train[:3]:
        fb.put(_item(d, "a"), d)
    for d in train[3:6]:
        fb.put(_item(d, "b"), d)
    fb.put(_item(val[0], "b"), val[0])  # b has both splits of its own
    _, items, _ = fb.write_dataset("m")
    lent = [i for i in items if i.label == "a" and i.split == "val"]
    assert len(lent) == 1
    stored = fb.get("m", lent[0].sha256)
    assert stored is not None
    assert (stored.split, stored.lent) == ("val", True)
    fb.put(_item(val[1], "a"), val[1])  # a val image of a's own
    _, items, _ = fb.write_dataset("m")
    assert {i.sha256 for i in items if i.label == "a" and i.split == "val"} == {
        lent[0].sha256,
        content_hash(val[1]),
    }
    relabelled, _ = fb.put(_item(train[0], "a"), train[0])  # a new label keeps the lend
    if relabelled.sha256 == lent[0].sha256:
        assert relabelled.split == "val"
