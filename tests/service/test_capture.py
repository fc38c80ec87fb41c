"""Capture sampling and the writer queue: which predictions a policy keeps, the per-hour
caps, and that a store that stalls drops captures (counted) without slowing a prediction."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import png_bytes
from service.runtime.capture_tap import CaptureTap, Sampler, image_kind
from training.storage.captures import CapturePolicy, CaptureRecord, Captures
from training.storage.s3 import ObjectStore

NOW = datetime(2026, 12, 3, 6, 15, tzinfo=UTC)


def _ranked(top1: float, top2: float, label: str = "cat") -> list[dict[str, Any]]:
    return [{"label": label, "score": top1}, {"label": "dog", "score": top2}]


def test_off_keeps_nothing() -> None:
    assert not CapturePolicy().enabled
    assert Sampler().choose(CapturePolicy(), _ranked(0.1, 0.05), NOW) is None


def test_rules_pick_low_confidence_low_margin_and_a_random_share() -> None:
    s = Sampler(random.Random(0))
    p = CapturePolicy(low_confidence_below=0.5, margin_below=0.1, max_per_class_per_hour=None)
    assert s.choose(p, _ranked(0.4, 0.3), NOW) == "low_confidence"
    assert s.choose(p, _ranked(0.55, 0.5), NOW) == "low_margin"
    assert s.choose(p, _ranked(0.9, 0.05), NOW) is None
    rate = CapturePolicy(rate=0.25, max_per_hour=10_000, max_per_class_per_hour=None)
    kept = sum(s.choose(rate, _ranked(0.9, 0.05), NOW) == "random" for _ in range(4000))
    assert 850 < kept < 1150  # 25 % of 4000, within a few standard deviations


def test_caps_per_hour_and_per_class_reset_with_the_hour() -> None:
    s = Sampler()
    p = CapturePolicy(rate=1.0, max_per_hour=5, max_per_class_per_hour=2)
    kept = [s.choose(p, _ranked(0.9, 0.1, label), NOW) for label in "aaabbbccc"]
    assert [k is not None for k in kept] == [True, True, False] * 2 + [True, False, False]
    later = NOW + timedelta(hours=1)
    assert s.choose(p, _ranked(0.9, 0.1, "a"), later) == "random"


def test_image_kinds() -> None:
    assert image_kind(png_bytes(0)) == "png"
    assert image_kind(b"\xff\xd8\xff\xe0rest") == "jpg"
    assert image_kind(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert image_kind(b"GIF89a") is None


class _StalledCaptures:
    """A store that hangs on every write until released (a slow S3): the one thing here that
    is not the real store, since a real one cannot be made to hang on cue."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: list[CaptureRecord] = []

    def policy(self, model: str) -> CapturePolicy | None:
        return None

    def put(self, record: CaptureRecord, image: bytes) -> None:
        self.release.wait(30)
        self.stored.append(record)


def test_a_stalled_store_drops_and_counts_without_blocking() -> None:
    store = _StalledCaptures()
    tap = CaptureTap(
        store,  # type: ignore[arg-type]
        CapturePolicy(rate=1.0, max_per_hour=1000, max_per_class_per_hour=None),
        queue_size=4,
        refresh_s=3600,
        clock=lambda: NOW,
    )
    started = time.perf_counter()
    for i in range(20):
        tap.observe(
            "m", "v1", f"20261203-061500{i:03d}-0123456789ab", [png_bytes(0)], [_ranked(0.9, 0.1)]
        )
    assert time.perf_counter() - started < 0.5  # never waits for the store
    assert tap.counts[("m", "dropped")] >= 20 - 4 - 2  # the queue's 4, one in the writer's hands
    store.release.set()
    assert tap.flush()
    assert len(store.stored) + tap.counts[("m", "dropped")] == 20
    assert tap.counts[("m", "stored")] == len(store.stored)


class _FailingCaptures(_StalledCaptures):
    def put(self, record: CaptureRecord, image: bytes) -> None:
        raise OSError("store down")


def test_a_failing_store_is_counted_and_the_writer_goes_on() -> None:
    tap = CaptureTap(
        _FailingCaptures(),  # type: ignore[arg-type]
        CapturePolicy(rate=1.0),
        queue_size=8,
        refresh_s=3600,
        clock=lambda: NOW,
    )
    for i in range(3):
        tap.observe(
            "m", "v1", f"20261203-061500{i:03d}-0123456789ab", [png_bytes(0)], [_ranked(0.9, 0.1)]
        )
    assert tap.flush()
    assert tap.counts[("m", "failed")] == 3


@pytest.mark.parametrize(
    "policy", [{"rate": -0.1}, {"low_confidence_below": 0}, {"max_per_hour": -1}]
)
def test_policy_bounds(policy: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CapturePolicy.model_validate(policy)


def test_quality_report_per_version_class_and_hour() -> None:
    from service.dataplane.quality import quality_report
    from training.storage.feedback import FeedbackItem, judgements
    from training.storage.quality_index import built

    ids = iter(range(100))

    def item(label: str, predicted: str | None, version: str, hours: int, score: float):
        n = next(ids)
        return FeedbackItem(
            model="m",
            sha256=f"{n:064x}",
            image="png",
            label=label,
            split="train",
            labelled_at=NOW + timedelta(hours=hours, minutes=len(label)),
            prediction_id=f"p{n}" if predicted else None,
            index=0 if predicted else None,
            predicted=predicted,
            predicted_score=score if predicted else None,
            version=version if predicted else None,
        )

    items = [
        item("a", "a", "v1", 0, 0.9),
        item("a", "b", "v1", 0, 0.4),
        item("b", "b", "v1", 1, 0.3),
        item("b", "b", "v2", 2, 0.8),
        item("a", None, "v2", 2, 0.0),  # an upload: not a measurement
    ]
    r = quality_report(built(judgements(items)), last=2)
    assert r["labels"] == 4
    assert r["last"] == {"labels": 2, "accuracy": 1.0, "versions": {"v1": 1, "v2": 1}}
    v1 = r["versions"]["v1"]
    assert v1["accuracy"] == pytest.approx(2 / 3)
    assert v1["low_confidence_rate"] == pytest.approx(2 / 3)  # 0.4 and 0.3 below 0.5
    assert v1["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}}
    assert v1["per_class_accuracy"] == {"a": 0.5, "b": 1.0}
    assert [h["labels"] for h in r["hours"]] == [2, 1, 1]
    empty = quality_report(built([]), last=10)
    assert empty["last"] == {"labels": 0, "accuracy": None, "versions": {}}


def test_the_stored_policy_applies_from_a_models_first_request(store: ObjectStore) -> None:
    """A replica that has not served the model yet reads its policy with the model (off the
    request path): the first prediction is captured under it, not under the default."""
    captures = Captures(store)
    captures.set_policy("m", CapturePolicy(rate=1.0, max_per_hour=1000))
    tap = CaptureTap(captures, CapturePolicy(), queue_size=8, refresh_s=3600, clock=lambda: NOW)
    tap.load_policy("m")
    tap.observe("m", "v1", "20261203-061500000-0123456789ab", [png_bytes(0)], [_ranked(0.9, 0.1)])
    assert tap.flush()
    assert tap.counts[("m", "stored")] == 1
    assert list(captures.list("m")) == [("20261203-061500000-0123456789ab", 0)]
