"""Bring your own weights: publish a model trained elsewhere as a verified version.

The upload is checked the way promote checks a version, before anything is written: the
safetensors parse (no pickle), the tensors are exactly the backbone's and head's (key set,
shapes, dtypes), the class names fit the head, calibration images decode under the request
limits. Then the version is published like a fine-tune's (weights, calibration crops, the
manifest last) and optionally promoted: it serves fp32 at once. Its OpenVINO graphs, made from
the calibration crops, come after, as the version's graph set (:class:`PendingGraphs`), and
replicas serving those modes switch when the set verifies. A refused upload writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from service.runtime.images import decode_request_images
from service.runtime.served_model import architecture_problems
from service.settings import ServeSettings
from training.backbones import BACKBONES
from training.openvino_ir import IrMode
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.stage_digests import split_stages
from training.storage.errors import SpecError
from training.storage.registry import Manifest, Registry
from training.version_crops import (
    CALIBRATION_IMAGES,
    graph_files,
    split_for_graphs,
    store_graph_set,
)


@dataclass(frozen=True)
class ImportRequest:
    """What a client uploads: weights, their architecture, and how to feed them."""

    model: str
    weights: bytes
    backbone: str
    class_names: list[str]
    preprocessing: Preprocessing
    calibration: list[bytes]
    graphs: tuple[IrMode, ...]
    quantize_images: int
    source: str | None = None
    int8_min_agreement: float = 0.0
    """INT8's agreement target (``REFIT_TRAINING__INT8_MIN_AGREEMENT``)."""


def _state(weights: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SpecError(f"not a safetensors file: {exc}", field="weights") from None


def check_import(req: ImportRequest, serve: ServeSettings) -> tuple[dict[str, Any], Any]:
    """The parsed weights and the uint8 calibration crops, or a 4xx naming what is wrong.
    Blocking (parses and decodes): call it off the event loop."""
    if req.backbone not in BACKBONES:
        known = ", ".join(sorted(BACKBONES))
        raise SpecError(f"unknown backbone {req.backbone!r}; known: {known}", field="backbone")
    state = _state(req.weights)
    try:
        problems = architecture_problems(req.backbone, len(req.class_names), state)
    except ValueError as exc:
        raise SpecError(str(exc), field="class_names") from None
    if problems:
        raise SpecError(
            f"the weights do not load into {req.backbone} with {len(req.class_names)} "
            f"classes: {'; '.join(problems)}",
            field="weights",
        )
    crops = decode_request_images(
        req.calibration,
        max_image_bytes=serve.max_image_bytes,
        max_pixels=serve.max_image_pixels,
        preprocessing=req.preprocessing,
        max_side=serve.max_image_side,
        max_aspect=serve.max_aspect_ratio,
        field="calibration",
    )
    return state, crops


@dataclass(frozen=True)
class PendingGraphs:
    """The graphs of an imported version, still to be made (after it was published)."""

    manifest: Manifest
    state: dict[str, torch.Tensor]
    calibration: torch.Tensor
    held_out: torch.Tensor | None
    modes: tuple[IrMode, ...]
    min_agreement: float | None = None

    def make(self, registry: Registry) -> list[str]:
        """Export the graphs and store them as the version's graph set; the modes stored
        (none when the export failed: the version serves fp32). Blocking: seconds."""
        files, records = graph_files(
            self.state,
            self.manifest.backbone,
            self.manifest.num_classes,
            self.calibration,
            self.held_out,
            self.modes,
            min_agreement=self.min_agreement,
        )
        return store_graph_set(registry, self.manifest, files, records)


def import_version(
    registry: Registry, req: ImportRequest, serve: ServeSettings
) -> tuple[dict[str, Any], PendingGraphs | None]:
    """Check, then publish the upload as a new version (not promoted): the version, and its
    graphs still to be made (None: none asked for, or no calibration images). Blocking: call
    it off the event loop."""
    state, crops = check_import(req, serve)
    manifest = registry.publish(
        split_stages(state, req.backbone, len(req.class_names)),  # shares a parent's stages
        model=req.model,
        calibration=crops[:CALIBRATION_IMAGES] if len(crops) else None,
        backbone=req.backbone,
        num_classes=len(req.class_names),
        class_names=req.class_names,
        preprocessing=req.preprocessing,
        dataset={"imported": True, "source": req.source, "calibration_images": len(crops)},
    )
    pending = None
    if req.graphs and len(crops):
        n_cal, n_held = split_for_graphs(len(crops), req.quantize_images)
        x = normalize(req.preprocessing, crops)
        held = x[n_cal : n_cal + n_held] if n_held else None
        modes = tuple(dict.fromkeys(req.graphs))
        pending = PendingGraphs(
            manifest, state, x[:n_cal], held, modes, min_agreement=req.int8_min_agreement or None
        )
    out = {
        "model": req.model,
        "version": manifest.version,
        "graphs_pending": list(pending.modes) if pending else [],
    }
    return out, pending
