"""Live quality of a served model, from the labels sent back for its captured predictions:
accuracy and confusion per version, accuracy per class, and accuracy per hour. A label for an
uploaded image (no prediction) is a training example, not a measurement, and is not counted.
The input drift comes from the replicas' windows of sampled feature distances
(``service.dataplane.drift``). Every store call runs off the event loop."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

from service.dataplane.curve import render_quality
from service.dataplane.store_calls import store_call
from training.storage.captures import hour_of
from training.storage.drift_scores import DriftScore, DriftScores
from training.storage.feedback import Feedback, FeedbackItem
from training.storage.registry import Registry


def quality_report(items: list[FeedbackItem], *, last: int) -> dict[str, Any]:
    """Accuracy of the predictions that were labelled: over the ``last`` labels (the live
    figure a retrain policy watches), per version (with its confusion, true label -> predicted
    label -> count, and accuracy per true class), and per hour (UTC), oldest first."""
    judged = sorted(
        (i for i in items if i.predicted is not None and i.version is not None),
        key=lambda i: i.labelled_at,
    )
    recent = judged[-last:] if last else []
    versions: dict[str, list[FeedbackItem]] = defaultdict(list)
    hours: dict[str, list[FeedbackItem]] = defaultdict(list)
    for i in judged:
        versions[str(i.version)].append(i)
        hours[hour_of(i.labelled_at)].append(i)

    def accuracy(group: list[FeedbackItem]) -> float | None:
        return sum(i.label == i.predicted for i in group) / len(group) if group else None

    per_version = {}
    for version, group in sorted(versions.items()):
        confusion: dict[str, Counter[str]] = defaultdict(Counter)
        for i in group:
            confusion[i.label][str(i.predicted)] += 1
        per_version[version] = {
            "labels": len(group),
            "accuracy": accuracy(group),
            "per_class_accuracy": {
                true: row[true] / sum(row.values()) for true, row in sorted(confusion.items())
            },
            "confusion": {
                true: dict(sorted(row.items())) for true, row in sorted(confusion.items())
            },
        }
    return {
        "labels": len(judged),
        "last": {"labels": len(recent), "accuracy": accuracy(recent)},
        "versions": per_version,
        "hours": [
            {"hour": h, "labels": len(g), "accuracy": accuracy(g)} for h, g in sorted(hours.items())
        ],
    }


class QualityUseCases:
    """The quality report and its chart, for the HTTP API."""

    def __init__(self, registry: Registry, *, alias: str) -> None:
        self.registry, self.alias = registry, alias
        self.feedback = Feedback(registry.store)
        self.drift = DriftScores(registry.store)

    def _items(self, model: str) -> list[FeedbackItem]:
        self.registry.serving(model, self.alias)
        return self.feedback.items(model)

    def _gather(self, model: str) -> tuple[list[FeedbackItem], DriftScore | None]:
        serving = self.registry.serving(model, self.alias)
        return self.feedback.items(model), self.drift.score(model, serving.version)

    async def report(self, model: str, *, last: int) -> dict[str, Any]:
        """The model's live quality (see :func:`quality_report`), with the input drift of
        the serving version over its replicas' sampled requests."""
        items, drift = await store_call(self._gather, model)
        return {"model": model, **quality_report(items, last=last), "drift": drift}

    async def chart(self, model: str) -> bytes:
        """PNG: live accuracy and labels per hour."""
        items = await store_call(self._items, model)
        hours = quality_report(items, last=0)["hours"]
        return await asyncio.to_thread(render_quality, hours)
