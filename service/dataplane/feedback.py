"""Feedback: true labels for captured predictions (or for uploaded images), kept as a
deduplicated dataset with a stable train/val split. Every store call and decode runs off the
event loop."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.dataplane.store_calls import store_call
from service.request_errors import BadRequestError, TooLargeError, UnsupportedImageError
from service.runtime.capture_tap import image_kind
from service.runtime.images import decode_request_images
from service.settings import RefitSettings
from training.image_cache import DiskImageCache
from training.storage.captures import Captures
from training.storage.errors import RefitError
from training.storage.feedback import (
    Feedback,
    FeedbackItem,
    content_hash,
    dataset_key,
    replaced_judgement,
    split_of,
    summary,
    trainable_splits,
)
from training.storage.quality_index import QualityIndexes
from training.storage.registry import Manifest, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackLabel:
    """One label sent back: for a captured prediction (its id and image index) or for an
    uploaded image."""

    label: str
    new_class: bool = False
    prediction_id: str | None = None
    index: int = 0
    image: bytes | None = None


def _node_image_cache(
    registry: Registry, settings: RefitSettings
) -> Callable[[str, str, bytes], None] | None:
    """Where a labelled image is also written: the node's image cache the jobs of this Ray
    cluster read (``training.image_cache``), so the retrain a label leads to reads the new
    images from disk instead of fetching them (~1 s of a loop job's scan for 100 labels on
    two loaded cores). Off for RayJobs (their pods have disks of their own) and with the
    cache off."""
    t = settings.training
    if t.launcher != "ray":
        return None
    cache = DiskImageCache.for_store(registry.store, t.image_cache_dir, t.image_cache_mb)
    if cache is None:
        return None

    def write(key: str, etag: str, data: bytes) -> None:
        try:
            cache.write(key, etag, data)
        except Exception as exc:  # a copy for speed: the label itself must not fail
            log.warning("labelled image not kept in the node's image cache: %s", exc)

    return write


class FeedbackUseCases:
    """Take labels back; summarise them; snapshot them as a dataset."""

    def __init__(self, registry: Registry, settings: RefitSettings) -> None:
        self.registry, self.settings = registry, settings
        self.feedback = Feedback(registry.store, _node_image_cache(registry, settings))
        self.quality = QualityIndexes(registry.store)
        self.captures = Captures(registry.store)
        self.counts: Counter[tuple[str, str]] = Counter()
        """(model, outcome) -> labels taken here: ``correct`` or ``wrong`` (the label of a
        captured prediction against its top-1), ``upload`` (an image with its label)."""

    def _serving(self, model: str) -> Manifest:
        return self.registry.serving_manifest(model, self.settings.serve.alias)

    async def label(self, model: str, label: FeedbackLabel) -> dict[str, Any]:
        """Store a label; the label must be a class of the serving version unless
        ``new_class`` says it is a new one."""
        return await store_call(self._label, model, label)

    def _label(self, model: str, req: FeedbackLabel) -> dict[str, Any]:
        s = self.settings.serve
        manifest = self._serving(model)
        if req.label not in manifest.class_names and not req.new_class:
            names = manifest.class_names
            shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
            raise BadRequestError(
                f"{req.label!r} is not a class of {model} {manifest.version} ({shown}); "
                "send new_class: true to add one",
                field="label",
            )
        predicted = version = score = None
        if req.prediction_id is not None:
            record = self.captures.get(model, req.prediction_id, req.index)
            data = self.captures.image(record, max_bytes=s.max_image_bytes)
            if record.predictions:
                predicted, score = record.predictions[0].label, record.predictions[0].score
            version = record.version
        else:
            assert req.image is not None
            data = req.image
            if len(data) > s.max_image_bytes:
                raise TooLargeError(f"{len(data)} bytes exceeds {s.max_image_bytes}", field="image")
            # the caps every request image has: bytes, pixels, sides, aspect, format
            try:
                decode_request_images(
                    [data],
                    max_image_bytes=s.max_image_bytes,
                    max_pixels=s.max_image_pixels,
                    preprocessing=manifest.preprocessing,
                    max_side=s.max_image_side,
                    max_aspect=s.max_aspect_ratio,
                )
            except RefitError as exc:
                exc.field = "image"  # the one image of this body, not images[0]
                raise
        kind = image_kind(data)
        if kind is None:
            raise UnsupportedImageError("JPEG, PNG or WebP only", field="image")
        sha = content_hash(data)
        item = FeedbackItem(
            model=model,
            sha256=sha,
            image=kind,
            label=req.label,
            split=split_of(sha, self.settings.capture.feedback_val_fraction),
            labelled_at=datetime.now(UTC),
            new_class=req.label not in manifest.class_names,
            prediction_id=req.prediction_id,
            index=req.index if req.prediction_id is not None else None,
            predicted=predicted,
            version=version,
            predicted_score=score,
        )
        stored, previous = self.feedback.put(item, data)
        judgement = stored.judgement()
        if judgement.judged:  # the live-quality counters: one read per report
            self.quality.record(model, judgement, replaced_judgement(stored, previous))
        outcome = (
            "upload" if predicted is None else "correct" if predicted == req.label else "wrong"
        )
        self.counts[(model, outcome)] += 1
        return {
            "model": model,
            "sha256": sha,
            "label": item.label,
            "split": stored.split,
            "new_class": item.new_class,
            "predicted": predicted,
            "previous_label": previous.label if previous else None,
        }

    async def overview(self, model: str) -> dict[str, Any]:
        """Labels per class and split, and where the dataset snapshot is written."""

        def read() -> dict[str, Any]:
            self._serving(model)
            items = self.feedback.items(model)
            _, left_out = trainable_splits(items)  # what a snapshot now would leave out
            return {
                "model": model,
                "labels": len(items),
                "per_split": summary(items),
                "dataset": self.registry.store.uri(dataset_key(model)),
                "classes_left_out": left_out,
            }

        return await store_call(read)

    async def write_dataset(self, model: str) -> dict[str, Any]:
        """Snapshot every label as the model's feedback dataset (a JSONL manifest that a
        fine-tune spec names as its ``dataset``)."""

        def write() -> dict[str, Any]:
            self._serving(model)
            uri, items, skipped = self.feedback.write_dataset(model)
            return {
                "model": model,
                "labels": len(items),
                "per_split": summary(items),
                "dataset": uri,
                "classes_left_out": skipped,
            }

        return await store_call(write)
