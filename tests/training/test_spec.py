"""Every bad spec gets a SpecError naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from training.job_settings import TrainingSettings
from training.spec import parse_spec
from training.storage.errors import SpecError

GOOD: dict[str, Any] = {
    "model": "digits-5to9",
    "base": {"backbone": "resnet18", "weights": None, "version": None},
    "dataset": "s3://refit/datasets/digits-5to9/",
    "freeze": {"policy": "head_only"},
    "epochs": 5,
    "batch_size": 32,
    "lr": 0.001,
    "workers": 2,
    "use_gpu": False,
}


def test_issue_example_parses() -> None:
    spec = parse_spec(GOOD)
    assert spec.freeze.policy == "head_only"
    assert spec.workers == 2


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"lr": 0}, "lr"),
        ({"lr": -1}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 51}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"workers": 0}, "workers"),
        ({"dataset": "s3://refit/datasets/../secrets/"}, "dataset"),
        ({"dataset": "https://example.com/x"}, "dataset"),
        ({"model": "../etc"}, "model"),
        ({"freeze": {"policy": "unknown"}}, "freeze"),
        ({"freeze": {"policy": "last_n_stages", "n": 0}}, "freeze.last_n_stages.n"),
        ({"freeze": {"policy": "patterns", "trainable": ["("]}}, "freeze.patterns.trainable"),
        ({"freeze": {"policy": "lp_ft", "probe_epochs": 5}}, "epochs"),
        ({"base": {"version": "no-at-sign"}}, "base.version"),
        ({"base": {}}, "base"),
        ({"base": {"backbone": "resnet18", "weights": "../../x"}}, "base.weights"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_specs(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**GOOD, **patch}, TrainingSettings(max_epochs=50, max_batch_size=512))
    assert err.value.field == field
    assert err.value.to_dict()["error"]["code"] == "invalid_spec"
    assert "Traceback" not in str(err.value)
