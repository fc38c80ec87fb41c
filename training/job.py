"""A fine-tune job from spec to published version: the driver side.

index the data -> resolve the base -> train (Ray Train) -> evaluate the best checkpoint on the
validation split -> compare with the alias' current version on the same split -> gate ->
publish (weights, then manifest) -> move the alias. A failed job publishes nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbones import build_backbone
from training.data import ImageDataset, Sample, index_dataset, make_loader
from training.errors import ConflictError, DataError, NotFoundError, RefitError, TrainingError
from training.gate import decide
from training.jobs import JobState, JobStore
from training.loop import Precision, evaluate
from training.preprocess import Preprocessing, crop_transform, eval_transform
from training.registry import Registry
from training.run import RunInputs, load_checkpoint_state, load_checkpoint_weights
from training.settings import RefitSettings
from training.spec import FinetuneSpec
from training.store import ObjectStore
from training.trainer import fit
from training.weights import resolve_base

log = logging.getLogger(__name__)


def _dataset(
    store: ObjectStore, samples: list[Sample], transform: Any, settings: RefitSettings
) -> ImageDataset:
    """An ImageDataset under the configured byte and pixel caps."""
    return ImageDataset(
        store,
        samples,
        transform,
        max_bytes=settings.training.max_image_bytes,
        max_pixels=settings.training.max_image_pixels,
    )


def evaluate_model(
    model: nn.Module,
    samples: list[Sample],
    *,
    store: ObjectStore,
    preprocessing: Preprocessing,
    classes: list[str],
    settings: RefitSettings,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Metrics of a model on samples (plain torch, in this process, CPU)."""
    ds = _dataset(store, samples, eval_transform(preprocessing), settings)
    loader = make_loader(ds, batch_size=batch_size, shuffle=False)
    acc = evaluate(
        model, loader, num_classes=len(classes), precision=Precision(torch.device("cpu"))
    )
    return acc.compute(classes)


def _calibration(
    samples: list[Sample], store: ObjectStore, pre: Preprocessing, settings: RefitSettings
) -> torch.Tensor:
    """Up to 32 validation crops (uint8), spread over the classes, stored with the version."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    picked: list[Sample] = []
    while len(picked) < min(32, len(samples)):
        for group in by_class.values():
            if group and len(picked) < 32:
                picked.append(group.pop(0))
    ds = _dataset(store, picked, crop_transform(pre), settings)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def run_finetune(
    spec: FinetuneSpec, settings: RefitSettings, *, job_id: str | None = None
) -> dict[str, Any]:
    """Run one job to the end; returns the JSON-ready result. Raises RefitError subclasses
    for bad specs and data; in that case nothing is published and no alias moves.

    With ``job_id`` the job's record (created by the API) is moved to running and then to its
    end; without, a record is created first. The outcome - published, rejected by the gate
    (state succeeded, with the gate's reasons), or failed (with the error) - is recorded in
    ``jobs/{job_id}.json`` either way.
    """
    store = ObjectStore(settings.s3)
    jobs = JobStore(store)
    if job_id is None or not store.exists(jobs.key(job_id)):
        job_id = jobs.create(spec, job_id=job_id)[0].job_id
    if jobs.transition(job_id, "running").terminal:
        raise ConflictError(f"job {job_id} already ended", field="job_id")
    try:
        result = _run(spec, settings, job_id=job_id, store=store)
    except RefitError as exc:
        _finish(jobs, job_id, "failed", reason=str(exc), error=exc.to_dict()["error"])
        raise
    except Exception as exc:
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        _finish(jobs, job_id, "failed", reason=error["message"], error=error)
        raise
    if result["published"]:
        reason = f"published {result['version']}" + (
            f" and moved {result['alias']}" if result["promoted"] else ""
        )
    else:
        reason = "not published: " + "; ".join(result["gate"].get("reasons") or ["gate failed"])
    _finish(jobs, job_id, "succeeded", reason=reason, result=result)
    return result


def _finish(jobs: JobStore, job_id: str, state: JobState, **fields: Any) -> None:
    try:
        jobs.transition(job_id, state, **fields)
    except RefitError as exc:  # the outcome itself matters more than its record
        log.warning("could not record the end of %s: %s", job_id, exc)


def _run(
    spec: FinetuneSpec, settings: RefitSettings, *, job_id: str, store: ObjectStore
) -> dict[str, Any]:
    started = time.time()
    registry = Registry(store)
    index = index_dataset(store, spec.dataset, val_fraction=spec.val_fraction, seed=spec.seed)
    base = resolve_base(spec.base, store=store, training=settings.training)
    preprocessing = spec.preprocess or base.preprocessing
    inputs = RunInputs(
        spec=spec,
        settings=settings,
        backbone=base.backbone,
        classes=index.classes,
        train=index.train,
        val=index.val,
        preprocessing=preprocessing,
        base_state=base.state_dict,
        keep_head=base.class_names == index.classes,
    )
    with tempfile.TemporaryDirectory(prefix="refit-") as work:
        result = fit(inputs, job_id=job_id, settings=settings, workdir=Path(work))
        if "data_error" in result.metrics:
            raise DataError(result.metrics["data_error"], field="dataset")
        if result.best_dir is None:
            raise TrainingError("training finished without a checkpoint")
        model = build_backbone(base.backbone, num_classes=len(index.classes))
        model.load_state_dict(load_checkpoint_weights(result.best_dir))
        bad = set(load_checkpoint_state(result.best_dir).get("bad_keys", []))
    val = [s for s in index.val if s.key not in bad]

    def score(m: nn.Module, pre: Preprocessing) -> dict[str, Any]:
        return evaluate_model(
            m, val, store=store, preprocessing=pre, classes=index.classes, settings=settings
        )

    candidate = score(model, preprocessing)

    incumbent_version, incumbent_top1, note = None, None, None
    alias, _ = registry.get_alias(spec.model, spec.alias)
    if alias is not None:
        try:
            inc_manifest, inc_state = registry.load(spec.model, spec.alias)
        except NotFoundError:
            inc_manifest = None
        if inc_manifest is not None and inc_manifest.class_names == index.classes:
            inc_model = build_backbone(inc_manifest.backbone, num_classes=len(index.classes))
            inc_model.load_state_dict(inc_state)
            inc_metrics = score(inc_model, inc_manifest.preprocessing)
            incumbent_version, incumbent_top1 = inc_manifest.version, inc_metrics["top1"]
        elif inc_manifest is not None:
            note = f"serving {inc_manifest.version} has other classes; not compared"
    gate = decide(
        candidate["top1"],
        min_accuracy=spec.gate.min_accuracy
        if spec.gate.min_accuracy is not None
        else settings.training.min_accuracy,
        max_regression=spec.gate.max_regression
        if spec.gate.max_regression is not None
        else settings.training.max_regression,
        incumbent_version=incumbent_version,
        incumbent_top1=incumbent_top1,
        incumbent_note=note,
    )

    version, promoted = None, False
    metrics = {k: candidate[k] for k in ("loss", "top1", "top5", "macro_f1", "images")}
    metrics.update(per_class=candidate["per_class"], confusion=candidate["confusion"])
    if gate.passed:
        manifest = registry.publish(
            model.state_dict(),
            model=spec.model,
            calibration=_calibration(val, store, preprocessing, settings),
            backbone=base.backbone,
            num_classes=len(index.classes),
            class_names=index.classes,
            preprocessing=preprocessing,
            freeze=spec.freeze.model_dump(mode="json"),
            hyperparameters=spec.model_dump(
                mode="json", exclude={"model", "base", "dataset", "freeze"}
            ),
            dataset={**index.summary(), "skipped_images": len(bad)},
            parent=base.parent,
            metrics=metrics,
            gate=gate.model_dump(mode="json"),
            job_id=job_id,
        )
        version = manifest.version
        if spec.promote:
            registry.set_alias(spec.model, spec.alias, version)
            promoted = True
    return {
        "job_id": job_id,
        "model": spec.model,
        "version": version,
        "published": version is not None,
        "promoted": promoted,
        "alias": spec.alias,
        "parent": base.parent,
        "metrics": metrics,
        "gate": gate.model_dump(mode="json"),
        "skipped_images": len(bad),
        "resumed_from_epoch": int(result.metrics.get("resumed_from_epoch", 0)),
        "epochs_run": int(result.metrics.get("epoch", 0)),
        "best_epoch": int(result.best_metrics.get("epoch", 0)),
        "images_per_s": float(result.metrics.get("images_per_s", 0.0)),
        "dataset": {**index.summary(), "skipped_images": len(bad)},
        "checkpoints": result.storage_uri,
        "seconds": round(time.time() - started, 2),
    }
