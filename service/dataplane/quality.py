"""Live quality of a served model, from the labels sent back for its captured predictions:
accuracy, confusion and low-confidence rate per version, accuracy per class, and accuracy per
hour, read from the model's quality counters (``training.storage.quality_index``). A label for an
uploaded image (no prediction) is a training example, not a measurement, and is not counted.
The input drift comes from the replicas' windows of sampled feature distances
(``service.runtime.drift``). Every store call runs off the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from service.dataplane.curve import render_quality
from service.dataplane.store_calls import store_call
from training.storage.drift_scores import DriftScore, DriftScores
from training.storage.quality_index import (
    LOW_CONFIDENCE,
    QualityIndex,
    QualityIndexes,
    per_class,
    tally_view,
    window,
)
from training.storage.registry import Registry


def quality_report(index: QualityIndex, *, last: int) -> dict[str, Any]:
    """Accuracy of the predictions that were labelled: over the ``last`` labels (the live
    figure a retrain policy watches), per version (with its confusion, true label -> predicted
    label -> count, accuracy per true class, and the share answered with a top-1 score below
    ``LOW_CONFIDENCE``), and per hour (UTC), oldest first."""
    return {
        "labels": index.labels,
        "last": window(index, last),
        "low_confidence_below": LOW_CONFIDENCE,
        "versions": {
            version: {
                **tally_view(t),
                "per_class_accuracy": per_class(t.confusion),
                "confusion": {k: dict(sorted(r.items())) for k, r in sorted(t.confusion.items())},
            }
            for version, t in sorted(index.versions.items())
        },
        "hours": [{"hour": h, **tally_view(t)} for h, t in sorted(index.hours.items())],
    }


class QualityUseCases:
    """The quality report and its chart, for the HTTP API."""

    def __init__(self, registry: Registry, *, alias: str) -> None:
        self.registry, self.alias = registry, alias
        self.indexes = QualityIndexes(registry.store)
        self.drift = DriftScores(registry.store)

    def _index(self, model: str) -> QualityIndex:
        self.registry.serving(model, self.alias)
        return self.indexes.read(model)

    def _gather(self, model: str) -> tuple[QualityIndex, DriftScore | None]:
        serving = self.registry.serving(model, self.alias)
        return self.indexes.read(model), self.drift.score(model, serving.version)

    async def report(self, model: str, *, last: int) -> dict[str, Any]:
        """The model's live quality (see :func:`quality_report`), with the input drift of
        the serving version over its replicas' sampled requests: a few reads, however many
        labels there are (``quality_index``)."""
        index, drift = await store_call(self._gather, model)
        return {"model": model, **quality_report(index, last=last), "drift": drift}

    async def chart(self, model: str) -> bytes:
        """PNG: live accuracy and labels per hour."""
        index = await store_call(self._index, model)
        hours = quality_report(index, last=0)["hours"]
        return await asyncio.to_thread(render_quality, hours)
