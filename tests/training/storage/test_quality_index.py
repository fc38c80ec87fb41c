"""The live-quality counters on a real SeaweedFS: built once from the label records, then one
read per report (no listing), updated by compare-and-swap under concurrent labels, a relabel
of the same prediction moving its judgement, and a damaged index rebuilt."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import png_bytes
from training.storage.feedback import Feedback, FeedbackItem, content_hash, replaced_judgement
from training.storage.quality_index import QualityIndexes, window
from training.storage.s3 import ObjectStore

T0 = datetime(2026, 12, 6, 10, tzinfo=UTC)


def _label(
    fb: Feedback,
    indexes: QualityIndexes,
    seed: int,
    label: str,
    predicted: str,
    *,
    pid: str | None = None,
    version: str = "v1",
    minutes: int = 0,
    score: float = 0.9,
) -> None:
    """What the feedback route does: store the record, then count it."""
    data = png_bytes(0, seed=seed)
    sha = content_hash(data)
    item = FeedbackItem(
        model="m",
        sha256=sha,
        image="png",
        label=label,
        split="train",
        labelled_at=T0 + timedelta(minutes=minutes),
        prediction_id=pid or f"p{seed}",
        index=0,
        predicted=predicted,
        predicted_score=score,
        version=version,
    )
    stored, previous = fb.put(item, data)
    indexes.record("m", stored.judgement(), replaced_judgement(stored, previous))


def _listings(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = store.list

    def counted(prefix: str, **kw: Any) -> Any:
        calls.append(prefix)
        return real(prefix, **kw)

    monkeypatch.setattr(store, "list", counted)
    return calls


def test_built_once_then_one_read_per_report(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fb, indexes = Feedback(store), QualityIndexes(store)
    for i in range(6):
        _label(fb, indexes, i, "a", "a" if i % 3 else "b", minutes=i)  # before any index
    listings = _listings(store, monkeypatch)
    index = indexes.read("m")  # built from the records (one listing) and stored
    assert (index.labels, index.versions["v1"].correct) == (6, 4)
    assert len(listings) == 1
    for i in range(6, 10):
        _label(fb, indexes, i, "a", "a", minutes=i)
    index = indexes.read("m")
    assert (index.labels, index.versions["v1"].correct) == (10, 8)
    assert len(listings) == 1  # counted as they came: no listing, one read
    assert window(index, 4) == {"labels": 4, "accuracy": 1.0, "versions": {"v1": 4}}


def test_concurrent_labels_are_all_counted(store: ObjectStore) -> None:
    fb, indexes = Feedback(store), QualityIndexes(store)
    indexes.read("m")  # an index exists (empty): every label updates it
    errors: list[BaseException] = []

    def labeller(start: int) -> None:
        try:
            for i in range(start, start + 15):
                _label(fb, indexes, i, "a", "a" if i % 2 else "b", minutes=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=labeller, args=(n * 100,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    index = indexes.read("m")
    assert index.labels == 45
    assert index.versions["v1"].correct == sum(
        i % 2 for n in range(3) for i in range(n * 100, n * 100 + 15)
    )


def test_a_relabel_of_the_same_prediction_moves_its_judgement(store: ObjectStore) -> None:
    fb, indexes = Feedback(store), QualityIndexes(store)
    indexes.read("m")
    _label(fb, indexes, 1, "a", "b", pid="p1", minutes=0, score=0.3)  # wrong, low confidence
    _label(fb, indexes, 1, "b", "b", pid="p1", minutes=1, score=0.3)  # corrected: right
    _label(fb, indexes, 1, "b", "b", pid="p2", version="v2", minutes=2)  # v2 judged it too
    index = indexes.read("m")
    assert index.labels == 2
    v1, v2 = index.versions["v1"], index.versions["v2"]
    assert (v1.labels, v1.correct, v1.low_confidence) == (1, 1, 1)
    assert v1.confusion == {"b": {"b": 1}}
    assert (v2.labels, v2.correct) == (1, 1)
    assert [r.key for r in index.recent] == ["p1:0", "p2:0"]
    # the same figures as a rebuild from the records (history included)
    store.delete(fb.quality_key("m"))
    assert indexes.read("m") == index


def test_a_damaged_index_is_rebuilt(store: ObjectStore) -> None:
    fb, indexes = Feedback(store), QualityIndexes(store)
    for i in range(3):
        _label(fb, indexes, i, "a", "a", minutes=i)
    store.put_bytes(fb.quality_key("m"), b"{not json")
    assert indexes.read("m").labels == 3
    _label(fb, indexes, 9, "a", "b", minutes=9)  # the rebuilt index is stored and updated
    assert indexes.read("m").labels == 4
