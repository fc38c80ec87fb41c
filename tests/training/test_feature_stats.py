"""The drift reference: fitted on features, written and read back, and refused when damaged."""

from __future__ import annotations

import pytest
import torch

from training.backbones import build_backbone, trunk
from training.feature_stats import MIN_IMAGES, FeatureStats, collect_outputs
from training.storage.errors import IntegrityError

CENTRES = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)) * 4


def _features(n: int, *, shift: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes around their centres, and each row's class."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 2.0, 64)
    cls = torch.arange(n) % 3
    return torch.randn(n, 64, generator=g) * spread + CENTRES[cls] + shift * spread, cls


def _share(stats: FeatureStats, f: torch.Tensor) -> float:
    return float((stats.distances(f) > stats.threshold).float().mean())


def test_in_distribution_is_about_five_percent_and_a_shift_is_far() -> None:
    stats = FeatureStats.fit(*_features(2000))
    assert stats is not None
    assert 0.03 < _share(stats, _features(2000, seed=1)[0]) < 0.08
    assert _share(stats, _features(500, shift=1.5, seed=2)[0]) > 0.95


def test_inputs_between_the_classes_are_outliers() -> None:
    # unlike every class, near the mean of all (where inverted images land): one Gaussian
    # around that mean would call them typical
    stats = FeatureStats.fit(*_features(900))
    assert stats is not None
    between = CENTRES.mean(0) + torch.randn(200, 64, generator=torch.Generator().manual_seed(4))
    assert _share(stats, between) > 0.95
    assert stats.centroids.shape == (3, 64)


def test_too_few_images_give_no_reference() -> None:
    held = _features(MIN_IMAGES, seed=5)[0]
    assert FeatureStats.fit(*_features(MIN_IMAGES - 1), held_out=held) is None
    assert FeatureStats.fit(*_features(MIN_IMAGES), held_out=held[:-1]) is None  # both short
    assert FeatureStats.fit(*_features(MIN_IMAGES), held_out=held) is not None
    # none held out: a quarter of the images is, so twice the minimum is needed
    assert FeatureStats.fit(*_features(2 * MIN_IMAGES - 1)) is None
    assert FeatureStats.fit(*_features(2 * MIN_IMAGES)) is not None


def test_a_held_out_threshold_is_not_too_tight() -> None:
    """Fitted on few images, a threshold measured on those same images is too tight (fresh
    in-distribution inputs are outliers far more often than 1 - QUANTILE); measured on
    images held out of the fit it is close to it, on average over draws."""
    same, held = [], []
    for seed in range(20):
        f, cls = _features(40, seed=100 + seed)
        fresh = _features(400, seed=200 + seed)[0]
        reference = FeatureStats.fit(f, cls, held_out=_features(40, seed=300 + seed)[0])
        assert reference is not None
        held.append(_share(reference, fresh))
        stats = FeatureStats.fit(f, cls)
        assert stats is not None
        in_sample = FeatureStats(stats.centroids, stats.std, 0.0)
        threshold = float(torch.quantile(in_sample.distances(f).double(), 0.95))
        same.append(_share(FeatureStats(stats.centroids, stats.std, threshold), fresh))
    mean_held, mean_same = sum(held) / len(held), sum(same) / len(same)
    assert 0.02 < mean_held < 0.12, mean_held
    assert mean_same > mean_held + 0.05, (mean_same, mean_held)


def test_a_feature_that_never_varied_does_not_make_every_input_an_outlier() -> None:
    f, cls = _features(200)
    f[:, 0] = 0.0  # a ReLU that stayed at zero on every reference image
    stats = FeatureStats.fit(f, cls)
    assert stats is not None
    live = _features(200, seed=3)[0]
    live[:, 0] = 1e-3
    assert float((stats.distances(live) > stats.threshold).float().mean()) < 0.2


def test_round_trip_and_damage() -> None:
    stats = FeatureStats.fit(*_features(100))
    assert stats is not None
    record = stats.record()
    assert (record.images, record.held_out) == (75, 25)  # every fourth row held out
    back = FeatureStats.from_bytes(stats.to_bytes(), record)
    assert (back.images, back.held_out) == (75, 25)
    assert torch.equal(back.centroids, stats.centroids)
    assert back.threshold == stats.threshold
    with pytest.raises(IntegrityError, match="not a feature statistics file"):
        FeatureStats.from_bytes(b"garbage", record)
    with pytest.raises(IntegrityError, match="does not hold 3 x 65 features"):
        FeatureStats.from_bytes(stats.to_bytes(), record.model_copy(update={"features": 65}))
    zero = FeatureStats(stats.centroids, torch.zeros_like(stats.std), stats.threshold)
    with pytest.raises(IntegrityError, match="non-finite or zero"):
        FeatureStats.from_bytes(zero.to_bytes(), record)


def test_collect_outputs_are_the_heads_input_and_output() -> None:
    net = build_backbone("resnet18", num_classes=3).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode(), collect_outputs(net, "resnet18") as got:
        net(x)
        net(x[:2])
    with torch.inference_mode():
        want = trunk(net, "resnet18")(x)
    assert [f.shape for f, _ in got] == [(5, 512), (2, 512)]
    assert torch.allclose(got[0][0], want, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(got[0][1], net(x), atol=1e-5)
    with torch.inference_mode():
        net(x)
    assert len(got) == 2  # the hook is gone after the block
