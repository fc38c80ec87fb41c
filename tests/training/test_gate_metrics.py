"""The gate's decisions and the metrics computed from a known confusion."""

from __future__ import annotations

import pytest
import torch

from training.classification_metrics import MetricAccumulator
from training.gate import decide


def test_gate_passes_without_incumbent() -> None:
    d = decide(0.8, min_accuracy=0.5, max_regression=0.01)
    assert d.passed
    assert "no serving model" in d.reasons[1]


@pytest.mark.parametrize(
    ("top1", "min_acc", "incumbent", "passed"),
    [
        (0.40, 0.50, None, False),  # below the floor
        (0.90, 0.50, 0.95, False),  # regresses more than 0.01
        (0.945, 0.50, 0.95, True),  # within the margin
        (0.97, 0.50, 0.95, True),  # better
    ],
)
def test_gate_rules(top1: float, min_acc: float, incumbent: float | None, passed: bool) -> None:
    d = decide(
        top1,
        min_accuracy=min_acc,
        max_regression=0.01,
        incumbent_version="v1",
        incumbent_top1=incumbent,
    )
    assert d.passed is passed
    assert len(d.reasons) == 2


def test_metrics_from_known_predictions() -> None:
    acc = MetricAccumulator(3)
    # targets 0,0,1,2 ; predictions 0,1,1,2  -> 3/4 correct
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    acc.update(logits, torch.tensor([0, 0, 1, 2]), loss_sum=2.0)
    m = acc.compute(["a", "b", "c"])
    assert m["top1"] == 0.75
    assert m["top5"] == 1.0
    assert m["loss"] == 0.5
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3, abs=1e-5),
        "support": 2,
    }
    assert m["per_class"]["b"]["precision"] == 0.5
