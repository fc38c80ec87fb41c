"""The in-process path of a one-worker job (``training.local_fit``), Ray-free by design:
the worker's loop in this process, its progress records and checkpoints on a real SeaweedFS,
a resume from the newest complete checkpoint, and the best weights handed back in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SMALL_PRE, small_run_inputs, write_imagefolder
from service.settings import RefitSettings
from training.backbones import build_backbone
from training.checkpoints import STATE_FILE
from training.data import index_dataset
from training.feature_stats import collect_outputs
from training.local_fit import checkpoint_prefix, fit_here, stored_checkpoints
from training.run_context import FitResult
from training.scoring import score_logits, score_parts
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore


@pytest.fixture
def dataset(store: ObjectStore) -> ObjectStore:
    write_imagefolder(store, "local", classes=3, train=6, val=6)
    return store


def _fit(
    store: ObjectStore,
    settings: RefitSettings,
    tmp_path: Path,
    *,
    job_id: str,
    epochs: int,
    interval: float,
) -> FitResult:
    over = {"checkpoint_interval_s": interval, "progress_interval_s": 0.01}
    inputs = small_run_inputs(store, settings, "local", policy="full", epochs=epochs, training=over)
    torch.manual_seed(0)
    return fit_here(inputs, job_id=job_id, workdir=tmp_path)


def _epochs(store: ObjectStore, job_id: str) -> list[int]:
    return [int(p.rstrip("/").rsplit("-", 1)[1]) for p in stored_checkpoints(store, job_id)]


def test_a_short_run_stores_no_checkpoint_and_hands_back_the_best_weights(
    dataset: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    """A run shorter than the interval uploads nothing (a failure repeats it whole); the best
    epoch's weights, its number and top-1 come back in memory; progress has the curve."""
    result = _fit(dataset, settings, tmp_path, job_id="short", epochs=3, interval=3600)
    assert stored_checkpoints(dataset, "short") == []
    assert result.best_weights is not None
    assert result.metrics["epoch"] == 3
    assert result.metrics["resumed_from_epoch"] == 0
    tops = [h["val_top1"] for h in result.state["history"]]
    kept = max(range(3), key=lambda i: (tops[i], i)) + 1
    assert result.best_metrics == {"epoch": kept, "val_top1": tops[kept - 1]}
    assert result.state["bad_keys"] == []
    progress = dataset.get_json(JobStore.progress_key("short"))
    assert [h["epoch"] for h in progress["history"]] == [1, 2, 3]
    assert dataset.get_json(JobStore.step_key("short"))["epochs"] == 3
    assert result.storage_uri == dataset.uri(checkpoint_prefix("short"))


def test_a_retry_resumes_from_the_newest_complete_checkpoint(
    dataset: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    """Interval 0: every epoch is checkpointed, the newest two are kept; a second attempt of
    the same job resumes from the newest complete one, and one without its state file (an
    upload cut short) is ignored."""
    first = _fit(dataset, settings, tmp_path, job_id="retry", epochs=4, interval=0)
    assert first.metrics["epoch"] == 4
    assert _epochs(dataset, "retry") == [3, 4]  # the older ones removed
    newest = stored_checkpoints(dataset, "retry")[-1]
    assert {o.key.removeprefix(newest) for o in dataset.list(newest)} >= {
        STATE_FILE,
        "model.safetensors",
        "optim.pt",
    }
    # an upload of a later epoch that did not finish: files but no state.json
    cut = f"{checkpoint_prefix('retry')}epoch-000005/model.safetensors"
    dataset.put_bytes(cut, b"partial")
    again = _fit(dataset, settings, tmp_path, job_id="retry", epochs=6, interval=3600)
    assert again.metrics["resumed_from_epoch"] == 4
    assert again.metrics["epoch"] == 6
    assert [h["epoch"] for h in again.state["history"]] == [1, 2, 3, 4, 5, 6]


def test_a_data_error_trains_nothing(
    store: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    write_imagefolder(store, "local", classes=3, train=6, val=6, corrupt=6)
    result = _fit(store, settings, tmp_path, job_id="bad", epochs=1, interval=0)
    assert result.best_weights is None
    assert "data_error" in result.metrics
    assert stored_checkpoints(store, "bad") == []


def test_the_best_epochs_validation_pass_scores_as_a_second_pass_would(
    dataset: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    """The run hands back its best epoch's validation outputs (features and logits, image by
    image): the publishing process scores on them instead of a second pass, with the same
    metrics and the same features for the drift threshold."""
    result = _fit(dataset, settings, tmp_path, job_id="outputs", epochs=3, interval=3600)
    kept = result.val_outputs
    index = index_dataset(dataset, dataset.uri("datasets/local/"))
    assert kept is not None
    assert kept.keys == [s.key for s in index.val]
    assert result.best_weights is not None
    model = build_backbone("resnet18", num_classes=3)
    model.load_state_dict(result.best_weights)
    with collect_outputs(model, "resnet18") as seen:
        again = score_parts(model, index.val, dataset, SMALL_PRE, index.classes, settings.training)
    scored = score_logits(index.val, kept.logits, index.classes)
    assert scored.all["confusion"] == again.all["confusion"]
    assert scored.all["top1"] == again.all["top1"]
    assert scored.all["loss"] == pytest.approx(again.all["loss"], rel=1e-4, abs=1e-5)
    assert torch.allclose(kept.features, torch.cat([f for f, _ in seen]), atol=1e-4)
    assert torch.allclose(kept.logits, torch.cat([o for _, o in seen]), atol=1e-4)
