"""The validation crops a version is published with: the few it keeps for the replicas'
load-time checks, and the many that its OpenVINO graphs are calibrated and measured on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from training.data import ImageDataset, Sample, shared_cache
from training.job_settings import TrainingSettings
from training.openvino_ir import ExportChild, IrMode, ir_files
from training.preprocess import crop_transform, normalize
from training.preprocessing_spec import Preprocessing
from training.storage.errors import RefitError
from training.storage.registry import GraphRecord, Manifest, Registry
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32
"""Validation crops kept with a version (load-time checks of the serving numeric modes)."""


def capped_dataset(
    store: ObjectStore, samples: list[Sample], transform: Any, training: TrainingSettings
) -> ImageDataset:
    """An ImageDataset under the configured byte and pixel caps."""
    return ImageDataset(
        store,
        samples,
        transform,
        max_bytes=training.max_image_bytes,
        max_pixels=training.max_image_pixels,
        cache=shared_cache(),  # the job's passes over the same images fetch each once
    )


def spread(samples: list[Sample], n: int) -> list[Sample]:
    """Up to ``n`` samples taken round-robin over the classes (in their order)."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    picked: list[Sample] = []
    while len(picked) < min(n, len(samples)):
        for group in by_class.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked


def _crops(
    samples: list[Sample], store: ObjectStore, pre: Preprocessing, training: TrainingSettings
) -> torch.Tensor:
    ds = capped_dataset(store, samples, crop_transform(pre), training)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def calibration_crops(
    samples: list[Sample], store: ObjectStore, pre: Preprocessing, training: TrainingSettings
) -> torch.Tensor:
    """Up to 32 validation crops (uint8), spread over the classes, stored with the version
    (the replicas' load-time checks run on them)."""
    return _crops(spread(samples, CALIBRATION_IMAGES), store, pre, training)


def split_for_graphs(n: int, quantize_images: int) -> tuple[int, int]:
    """How many of ``n`` crops calibrate (up to ``quantize_images``, leaving a quarter at
    least held out) and how many are held out after them (up to ``quantize_images``)."""
    n_cal = min(quantize_images, n - n // 4)
    return n_cal, min(n - n_cal, quantize_images)


def graph_files(
    state: dict[str, torch.Tensor],
    backbone: str,
    num_classes: int,
    calibration: torch.Tensor,
    held_out: torch.Tensor | None,
    modes: tuple[IrMode, ...],
    child: ExportChild | None = None,
    min_agreement: float | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """OpenVINO graphs for ``modes`` (normalised crops in) as a version's files and its
    manifest's ``graphs`` records, made by ``child`` (an export process started ahead;
    unset: one starts now); INT8 kept at ``min_agreement`` where it can be. A failed export
    is logged and yields none: the graphs are an optimisation, fp32 still serves."""
    if not modes or not len(calibration):
        return {}, {}
    try:
        with child or ExportChild() as exporter:
            exported = exporter.export(
                state,
                backbone=backbone,
                num_classes=num_classes,
                calibration=calibration,
                held_out=held_out,
                modes=modes,
                min_agreement=min_agreement,
            )
    except Exception as exc:
        log.warning("OpenVINO export failed; publishing without graphs: %s", exc)
        return {}, {}
    files: dict[str, bytes] = {}
    records: dict[str, Any] = {}
    for g in exported:
        xml, weights = ir_files(g.mode)
        files[xml], files[weights] = g.xml, g.weights
        records[g.mode] = {"files": [xml, weights], **g.measured()}
    return files, records


def publish_graphs(
    model: nn.Module,
    backbone: str,
    num_classes: int,
    val: list[Sample],
    store: ObjectStore,
    pre: Preprocessing,
    training: TrainingSettings,
    child: ExportChild | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The version's OpenVINO graphs (``training.export_graphs``) as files and manifest
    records: INT8 calibrated, and both measured, on up to ``quantize_images`` validation
    crops; agreement measured again on the rest (held out). ``child``: an export process
    started ahead (:class:`ExportChild`; unset: one starts now)."""
    modes = tuple(dict.fromkeys(training.export_graphs))
    if not modes or not val:
        return {}, {}
    ordered = spread(list(val), len(val))
    n_cal, n_held = split_for_graphs(len(ordered), training.quantize_images)
    cal_samples, held_samples = ordered[:n_cal], ordered[n_cal : n_cal + n_held]
    calibration = normalize(pre, _crops(cal_samples, store, pre, training))
    held = normalize(pre, _crops(held_samples, store, pre, training)) if held_samples else None
    return graph_files(
        model.state_dict(),
        backbone,
        num_classes,
        calibration,
        held,
        modes,
        child,
        training.int8_min_agreement or None,
    )


def store_graph_set(
    registry: Registry, manifest: Manifest, files: dict[str, bytes], records: dict[str, Any]
) -> list[str]:
    """Store graphs made after ``manifest``'s version was published (:func:`graph_files`'
    output) as that version's graph set; the modes stored (none when there were none or the
    store refused: the version serves fp32, which is logged)."""
    if not records:
        return []
    graphs = {
        mode: GraphRecord.model_validate(
            {**record, "files": [f"graphs/{name}" for name in record["files"]]}
        )
        for mode, record in records.items()
    }
    try:
        registry.publish_graph_set(
            manifest, {f"graphs/{name}": blob for name, blob in files.items()}, graphs
        )
    except RefitError as exc:
        log.warning("graphs of %s not stored: %s", manifest.version, exc)
        return []
    return sorted(graphs)
