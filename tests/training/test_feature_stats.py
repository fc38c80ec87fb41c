"""The drift reference: fitted on features, written and read back, and refused when damaged."""

from __future__ import annotations

import pytest
import torch

from training.backbones import build_backbone, trunk
from training.feature_stats import MIN_IMAGES, FeatureStats, collect_features
from training.storage.errors import IntegrityError


def _features(n: int, *, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 2.0, 64)
    return torch.randn(n, 64, generator=g) * spread + 3.0 + shift * spread


def test_in_distribution_is_about_five_percent_and_a_shift_is_far() -> None:
    stats = FeatureStats.fit(_features(2000))
    assert stats is not None
    same = (stats.distances(_features(2000, seed=1)) > stats.threshold).float().mean()
    moved = (stats.distances(_features(500, shift=1.0, seed=2)) > stats.threshold).float().mean()
    assert 0.03 < float(same) < 0.08
    assert float(moved) > 0.95


def test_too_few_images_give_no_reference() -> None:
    assert FeatureStats.fit(_features(MIN_IMAGES - 1)) is None
    assert FeatureStats.fit(_features(MIN_IMAGES)) is not None


def test_a_feature_that_never_varied_does_not_make_every_input_an_outlier() -> None:
    f = _features(200)
    f[:, 0] = 0.0  # a ReLU that stayed at zero on every reference image
    stats = FeatureStats.fit(f)
    assert stats is not None
    live = _features(200, seed=3)
    live[:, 0] = 1e-3
    assert float((stats.distances(live) > stats.threshold).float().mean()) < 0.2


def test_round_trip_and_damage() -> None:
    stats = FeatureStats.fit(_features(100))
    assert stats is not None
    record = stats.record(100)
    back = FeatureStats.from_bytes(stats.to_bytes(), record)
    assert torch.equal(back.mean, stats.mean)
    assert back.threshold == stats.threshold
    with pytest.raises(IntegrityError, match="not a feature statistics file"):
        FeatureStats.from_bytes(b"garbage", record)
    with pytest.raises(IntegrityError, match="does not hold 65 features"):
        FeatureStats.from_bytes(stats.to_bytes(), record.model_copy(update={"features": 65}))
    zero = FeatureStats(stats.mean, torch.zeros_like(stats.std), stats.threshold)
    with pytest.raises(IntegrityError, match="non-finite or zero"):
        FeatureStats.from_bytes(zero.to_bytes(), record)


def test_collect_features_are_the_heads_input() -> None:
    net = build_backbone("resnet18", num_classes=3).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode(), collect_features(net, "resnet18") as got:
        net(x)
        net(x[:2])
    with torch.inference_mode():
        want = trunk(net, "resnet18")(x)
    assert [t.shape for t in got] == [(5, 512), (2, 512)]
    assert torch.allclose(got[0], want, atol=1e-5)
    with torch.inference_mode():
        net(x)
    assert len(got) == 2  # the hook is gone after the block
