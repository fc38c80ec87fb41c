"""The drift score of served inputs on a real SeaweedFS: sampled off the request path,
measured against the version's reference, written per replica and added up by readers."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import torch

from conftest import inverted_png, png_bytes, publish_tiny_model
from service.runtime.drift import DriftMonitor
from service.runtime.images import decode_request_images
from service.runtime.served_model import ServedModel, load_served_model
from training.feature_stats import FILE
from training.preprocess import normalize
from training.storage.drift_scores import MAX_AGE_S, DriftScores, DriftWindow
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore


def _inputs(served: ServedModel, images: list[bytes]) -> torch.Tensor:
    pre = served.preprocessing
    crops = decode_request_images(
        images, max_image_bytes=10**6, max_pixels=10**6, preprocessing=pre
    )
    return normalize(pre, crops)


def _monitor(store: ObjectStore, **kw: object) -> DriftMonitor:
    args: dict[str, object] = {
        "sample_rate": 1.0,
        "queue_size": 64,
        "window": 100,
        "flush_s": 3600,
        "rng": random.Random(0),
    }
    return DriftMonitor(DriftScores(store), **(args | kw))  # type: ignore[arg-type]


def test_in_distribution_stays_low_and_a_shift_is_seen(store: ObjectStore) -> None:
    registry = Registry(store)
    manifest, _ = publish_tiny_model(registry, "drifty", drift=True)
    served = load_served_model(registry, "drifty", manifest.version, drift=True)
    assert served.reference is not None
    like_val = [png_bytes(i % 3, seed=500 + i) for i in range(60)]
    shifted = [inverted_png(png_bytes(i % 3, seed=900 + i)) for i in range(60)]
    a, b = _monitor(store), _monitor(store)  # two replicas
    for i in range(0, 60, 6):
        a.observe(served, _inputs(served, like_val[i : i + 6]))
    assert a.flush()
    scores = DriftScores(store)
    low = scores.score("drifty", manifest.version)
    assert low is not None
    assert low.samples == 60
    assert low.replicas == 1
    assert low.score is not None
    assert low.score < 0.3
    assert a.snapshot()["drifty"]["samples"] == 60

    for i in range(0, 60, 6):
        b.observe(served, _inputs(served, shifted[i : i + 6]))
    assert b.flush()
    both = scores.score("drifty", manifest.version)
    assert both is not None
    assert both.replicas == 2
    assert both.samples == 120
    assert both.outliers >= 60 + low.outliers - 3  # nearly every inverted image is far out
    assert both.score is not None
    assert both.score > 0.45


def test_sampling_draws_the_share_and_a_model_without_reference_costs_nothing(
    store: ObjectStore,
) -> None:
    registry = Registry(store)
    manifest, _ = publish_tiny_model(registry, "nodrift")  # no feature statistics
    served = load_served_model(registry, "nodrift", manifest.version, drift=True)
    assert served.reference is None
    assert served.trunk is None
    monitor = _monitor(store)
    monitor.observe(served, _inputs(served, [png_bytes(0)] * 4))
    assert monitor._thread is None  # nothing queued, no thread started

    manifest, _ = publish_tiny_model(registry, "sampled", drift=True)
    served = load_served_model(registry, "sampled", manifest.version, drift=True)
    tenth = _monitor(store, sample_rate=0.1)
    x = _inputs(served, [png_bytes(i % 3, seed=i) for i in range(8)])
    for _ in range(50):
        tenth.observe(served, x)
    assert tenth.flush()
    assert 20 <= tenth.snapshot()["sampled"]["samples"] <= 65  # 10 % of 400


def test_a_full_queue_drops_and_counts_without_blocking(store: ObjectStore) -> None:
    registry = Registry(store)
    manifest, _ = publish_tiny_model(registry, "busy", drift=True)
    served = load_served_model(registry, "busy", manifest.version, drift=True)
    monitor = _monitor(store, queue_size=2)
    x = _inputs(served, [png_bytes(i % 3, seed=i) for i in range(16)])
    started = time.perf_counter()
    for _ in range(40):
        monitor.observe(served, x)
    assert time.perf_counter() - started < 0.5  # offering never waits for the trunk
    assert monitor.flush(timeout=60)
    snap = monitor.snapshot()["busy"]
    assert snap["dropped"] > 0
    assert snap["samples"] + snap["dropped"] == 40 * 16
    window = DriftScores(store).windows("busy", manifest.version)[0]
    assert window.dropped == snap["dropped"]


def test_a_new_version_gets_its_own_window(store: ObjectStore) -> None:
    registry = Registry(store)
    first, _ = publish_tiny_model(registry, "swapped", drift=True)
    second, _ = publish_tiny_model(registry, "swapped", drift=True)
    old = load_served_model(registry, "swapped", first.version, drift=True)
    new = load_served_model(registry, "swapped", second.version, drift=True)
    monitor = _monitor(store)
    monitor.observe(old, _inputs(old, [png_bytes(0)] * 3))
    monitor.observe(new, _inputs(new, [png_bytes(1)] * 5))
    monitor.observe(old, _inputs(old, [png_bytes(2)] * 2))  # a batch that began before the swap
    assert monitor.flush()
    scores = DriftScores(store)
    old_score, new_score = (
        scores.score("swapped", first.version),
        scores.score("swapped", second.version),
    )
    assert old_score is not None
    assert old_score.samples == 5  # the late batch joined the old window, not a new one
    assert new_score is not None
    assert new_score.samples == 5
    assert monitor.snapshot()["swapped"]["version"] == second.version


def test_damaged_and_stale_windows_are_left_out(store: ObjectStore) -> None:
    scores = DriftScores(store)
    now = datetime.now(UTC)
    fresh = DriftWindow(
        model="m",
        version="v1",
        replica="r1",
        updated_at=now,
        samples=100,
        outliers=40,
        mean_distance=2.0,
        threshold=1.0,
        expected=0.05,
        total_samples=100,
    )
    scores.put(fresh)
    scores.put(
        fresh.model_copy(
            update={"replica": "r2", "updated_at": now - timedelta(seconds=MAX_AGE_S + 1)}
        )
    )
    store.put_bytes("drift/m/v1/r3.json", b"{not json")
    store.put_json("drift/m/v1/r4.json", {**fresh.model_dump(mode="json"), "version": "v2"})
    score = scores.score("m", "v1", now=now)
    assert score is not None
    assert score.replicas == 1
    assert score.score == 0.4
    assert scores.score("m", "v9") is None


def test_a_damaged_reference_serves_the_version_without_drift(store: ObjectStore) -> None:
    from training.storage.registry import sha256_hex

    registry = Registry(store)
    manifest, _ = publish_tiny_model(registry, "badref", drift=True)
    # the file verifies (its hash is in the manifest) but holds no statistics: the weights
    # still serve, only the drift score is off for this version
    blob = b"not safetensors"
    files = dict(manifest.files)
    files[FILE] = files[FILE].model_copy(update={"sha256": sha256_hex(blob), "size": len(blob)})
    key = f"models/badref/versions/{manifest.version}"
    store.put_bytes(f"{key}/{FILE}", blob)
    damaged = manifest.model_copy(update={"files": files})
    store.put_bytes(f"{key}/manifest.json", Registry.manifest_bytes(damaged))
    served = load_served_model(registry, "badref", manifest.version, drift=True)
    assert served.reference is None
    assert served.top_k(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 1)
