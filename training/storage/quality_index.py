"""Live-quality counters of one model, kept beside its labels so a quality report is one
read, however many labels there are: ``feedback/{model}/quality.json``.

Each label of a captured prediction (a judgement of the version that answered it) updates
the counters by compare-and-swap (a writer that lost the race reads again); relabelling the
same prediction moves its judgement, it does not add one. The index is derived data: when it
is missing or damaged, or an update could not be stored, the next reader rebuilds it from the
label records (one listing) and creates it (never over an index that exists by then). A label
stored while the first index is being built, and counted before that index exists, is missed
by it (the record keeps it; dropping the index rebuilds it).

Bounded: the last ``RECENT`` judgements (the live window), ``HOURS`` hours and ``VERSIONS``
versions (the oldest dropped beyond them).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from training.storage.captures import hour_of
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, RefitError
from training.storage.feedback import Feedback, Judgement, judgements
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

RECENT = 2000
"""Judgements the live window can span (``last`` of a quality report)."""
HOURS = 24 * 14
VERSIONS = 100
LOW_CONFIDENCE = 0.5
"""A judged prediction whose top-1 score is below this counts as low-confidence."""
_ATTEMPTS = 8


class Tally(BaseModel):
    """Judgements of one group (a version, an hour) and how many were right."""

    model_config = ConfigDict(extra="forbid")

    labels: int = 0
    correct: int = 0
    low_confidence: int = 0
    """Judged predictions whose top-1 score was below ``LOW_CONFIDENCE``."""
    scored: int = 0
    """Judged predictions whose score is known (the low-confidence rate's denominator)."""
    confusion: dict[str, dict[str, int]] = Field(default_factory=dict)
    """True label -> predicted label -> count (versions only)."""
    first_at: datetime | None = None


class Recent(BaseModel):
    """One judgement of the live window."""

    model_config = ConfigDict(extra="forbid")

    key: str
    version: str
    correct: bool


class QualityIndex(BaseModel):
    """Counters over every judgement of a model (see the module)."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 4 * 1024 * 1024
    """Counters per class and version and the last ``RECENT`` judgements: well under this."""

    labels: int = 0
    versions: dict[str, Tally] = Field(default_factory=dict)
    hours: dict[str, Tally] = Field(default_factory=dict)
    recent: list[Recent] = Field(default_factory=list)

    def add(self, j: Judgement, sign: int = 1) -> None:
        """Count a judgement (``sign`` -1: take it back, when its prediction is relabelled)."""
        version, right = str(j.version), j.label == j.predicted
        hour = hour_of(j.labelled_at)
        for group, name, with_confusion in (
            (self.versions, version, True),
            (self.hours, hour, False),
        ):
            tally = group.setdefault(name, Tally(first_at=j.labelled_at))
            tally.labels += sign
            tally.correct += sign * right
            if j.predicted_score is not None:
                tally.scored += sign
                tally.low_confidence += sign * (j.predicted_score < LOW_CONFIDENCE)
            if with_confusion:
                row = tally.confusion.setdefault(j.label, {})
                row[str(j.predicted)] = row.get(str(j.predicted), 0) + sign
                if row[str(j.predicted)] <= 0:
                    del row[str(j.predicted)]
                if not row:
                    del tally.confusion[j.label]
            if tally.labels <= 0:
                del group[name]
        self.labels += sign
        key = str(j.prediction_key)
        if sign > 0:
            self.recent = [
                *[r for r in self.recent if r.key != key],
                Recent(key=key, version=version, correct=right),
            ][-RECENT:]
        self._bound()

    def _bound(self) -> None:
        for group, keep in ((self.hours, HOURS), (self.versions, VERSIONS)):
            if len(group) > keep:
                order = sorted(group, key=lambda k: (group[k].first_at or datetime.min, k))
                for name in order[: len(group) - keep]:
                    del group[name]

    def moved(self, new: Judgement, old: Judgement | None) -> None:
        """A label stored: ``new`` counts, and ``old`` (the same prediction's earlier
        judgement, when relabelled) no longer does."""
        if old is not None:
            self.add(old, -1)
        self.add(new)


def built(items_judgements: list[Judgement]) -> QualityIndex:
    """The index of these judgements (oldest first)."""
    index = QualityIndex()
    for j in items_judgements:
        index.add(j)
    return index


class QualityIndexes:
    """The quality indexes of every model on one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.feedback = Feedback(store)

    def _key(self, model: str) -> str:
        return self.feedback.quality_key(model)

    def read(self, model: str) -> QualityIndex:
        """The model's index: one read, or a rebuild from the label records when it is
        missing or damaged (then stored)."""
        key = self._key(model)
        try:
            return self.store.get_record(key, QualityIndex)
        except NotFoundError:
            pass
        except IntegrityError as exc:
            log.warning("rebuilding a damaged quality index: %s", exc)
            with contextlib.suppress(RefitError):
                self.store.delete(key)
        index = built(judgements(self.feedback.items(model)))
        try:
            # created only where none is: an index another reader built, or a label counted
            # into, meanwhile is never overwritten by this (older) listing
            self.store.put_record(key, index, if_none_match=True)
        except ConflictError:
            pass
        except RefitError as exc:  # served from the rebuild; the next read tries again
            log.warning("quality index %s not stored: %s", key, exc)
        return index

    def record(self, model: str, new: Judgement, old: Judgement | None) -> None:
        """Count a stored label (compare-and-swap; retried on a lost race). When it cannot
        be stored, the index is dropped: the next reader rebuilds it, never a wrong one."""
        key = self._key(model)
        for _ in range(_ATTEMPTS):
            try:
                index, etag = self.store.get_record_with_etag(key, QualityIndex)
            except NotFoundError:
                return  # the first reader builds it, this label included
            except IntegrityError:
                break
            index.moved(new, old)
            try:
                self.store.put_record(key, index, if_match=etag)
                return
            except ConflictError:
                continue  # another label landed first: count on top of it
            except RefitError:
                break
        log.warning("quality index of %s not updated; dropped for a rebuild", model)
        try:
            self.store.delete(key)
        except RefitError as exc:
            log.warning("quality index %s could not be dropped: %s", key, exc)


def tally_view(tally: Tally) -> dict[str, Any]:
    """A tally as a report shows it: counts, accuracy and low-confidence rate."""
    return {
        "labels": tally.labels,
        "accuracy": tally.correct / tally.labels if tally.labels else None,
        "low_confidence_rate": tally.low_confidence / tally.scored if tally.scored else None,
    }


def per_class(confusion: dict[str, dict[str, int]]) -> dict[str, float]:
    """Accuracy per true class from a confusion table."""
    return {
        true: row.get(true, 0) / sum(row.values())
        for true, row in sorted(confusion.items())
        if sum(row.values())
    }


def window(index: QualityIndex, last: int) -> dict[str, Any]:
    """The live window: the last ``last`` judgements (at most ``RECENT``)."""
    recent = index.recent[-last:] if last else []
    versions = Counter(r.version for r in recent)
    return {
        "labels": len(recent),
        "accuracy": sum(r.correct for r in recent) / len(recent) if recent else None,
        "versions": dict(sorted(versions.items())),
    }


__all__ = [
    "LOW_CONFIDENCE",
    "RECENT",
    "QualityIndex",
    "QualityIndexes",
    "built",
    "per_class",
    "tally_view",
    "window",
]
