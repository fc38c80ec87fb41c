"""A run checkpoints at intervals, not after every epoch, and every checkpoint carries the best
epoch's weights (issue 12, small jobs): the worker alone (Ray-free by design), reading its
images from a real SeaweedFS, on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import small_run_inputs, write_imagefolder
from service.settings import RefitSettings
from training.checkpoints import (
    BEST_FILE,
    load_best_weights,
    load_checkpoint_state,
    load_checkpoint_weights,
    save_checkpoint,
)
from training.run_context import RunContext
from training.storage.s3 import ObjectStore
from training.worker import _BestWeights, run_worker


def _run(
    store: ObjectStore,
    settings: RefitSettings,
    tmp_path: Path,
    *,
    interval: float,
    epochs: int,
    lr: float = 0.01,
) -> list[tuple[dict[str, Any], Path | None]]:
    """Every report of the run: its metrics, and a copy of the checkpoint it carried."""
    over = {"checkpoint_interval_s": interval}
    inputs = small_run_inputs(
        store, settings, "cadence", policy="full", epochs=epochs, training=over
    )
    reports: list[tuple[dict[str, Any], Path | None]] = []

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"report-{len(reports)}"
            shutil.copytree(checkpoint, kept)
            shutil.rmtree(checkpoint)  # the report owns the directory
        reports.append((metrics, kept))

    torch.manual_seed(0)
    run_worker(
        inputs,
        RunContext(
            rank=0, world_size=1, device=torch.device("cpu"), wrap_model=lambda m: m, report=report
        ),
    )
    return reports


@pytest.fixture
def dataset(store: ObjectStore) -> ObjectStore:
    write_imagefolder(store, "cadence", classes=3, train=6, val=6)
    return store


def test_every_checkpoint_carries_the_best_epochs_weights(
    dataset: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    """Interval 0: a checkpoint per epoch, each carrying the weights of the best epoch so far
    (the later one on a tie), which are that epoch's own checkpoint's weights exactly (the
    case where they are an earlier epoch's: the test below)."""
    reports = _run(dataset, settings, tmp_path, interval=0, epochs=4)
    checkpoints = [ckpt for _, ckpt in reports]
    assert all(c is not None for c in checkpoints)
    tops = [m["val_top1"] for m, _ in reports]
    for n, ckpt in enumerate(checkpoints, start=1):
        assert ckpt is not None
        state = load_checkpoint_state(ckpt)
        kept = max(range(n), key=lambda i: (tops[i], i)) + 1
        assert (state["epoch"], state["kept_epoch"], state["kept_top1"]) == (
            n,
            kept,
            tops[kept - 1],
        )
        assert (ckpt / BEST_FILE).exists() == (kept != n)
        own = checkpoints[kept - 1]
        assert own is not None
        expected, carried = load_checkpoint_weights(own), load_best_weights(ckpt)
        assert expected.keys() == carried.keys()
        assert all(torch.equal(expected[k], carried[k]) for k in expected)


def test_a_long_interval_checkpoints_only_the_last_epoch(
    dataset: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    reports = _run(dataset, settings, tmp_path, interval=3600, epochs=3)
    assert [ckpt is not None for _, ckpt in reports] == [False, False, True]
    last = reports[-1][1]
    assert last is not None
    tops = [m["val_top1"] for m, _ in reports]
    kept = max(range(3), key=lambda i: (tops[i], i)) + 1
    state = load_checkpoint_state(last)
    assert (state["epoch"], state["kept_epoch"]) == (3, kept)
    assert (last / BEST_FILE).exists() == (kept != 3)


def test_an_epoch_worse_than_the_best_checkpoints_the_best_weights_beside_its_own(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(3, 2)
    ctx = RunContext(
        rank=0, world_size=1, device=torch.device("cpu"), wrap_model=lambda m: m, report=print
    )
    state: dict[str, Any] = {"epoch": 0, "history": []}
    best = _BestWeights(state, ctx, model)
    seen = {}
    for epoch, top1 in ((1, 0.5), (2, 0.7), (3, 0.6)):
        with torch.no_grad():
            model.weight.add_(1.0)  # an epoch of training
        seen[epoch] = model.weight.detach().clone()
        state["epoch"] = epoch
        best.offer(model, epoch, top1)
    assert (state["kept_epoch"], state["kept_top1"]) == (2, 0.7)
    carried = best.beside(3)
    assert carried is not None
    assert torch.equal(carried["weight"], seen[2])
    save_checkpoint(
        tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), _Sched(), state, carried
    )
    assert torch.equal(load_best_weights(tmp_path)["weight"], seen[2])
    assert torch.equal(load_checkpoint_weights(tmp_path)["weight"], seen[3])
    best.offer(model, 4, 0.7)  # a tie: the later epoch
    assert state["kept_epoch"] == 4
    assert best.beside(4) is None


class _Sched:
    def state_dict(self) -> dict[str, Any]:
        return {}
