"""Live drift windows on the object store: each serving replica's recent feature distances.

Layout (under the configured prefix)::

    drift/{model}/{version}/{replica}.json   one replica's window, rewritten as it fills

A replica samples served images, measures their penultimate features against the version's
reference (``training.feature_stats``) and keeps its last N outcomes; readers (the quality
endpoint, the job runner's ``drift_above`` trigger) add up the windows of a version that are
fresh. A replica rewrites its window at least every ``HEARTBEAT_S`` while it serves the
version, so a window older than ``MAX_AGE_S`` is one of a replica that has gone.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from training.storage.errors import IntegrityError, NotFoundError
from training.storage.ids import check_ids
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 300.0
MAX_AGE_S = 900.0


class DriftWindow(BaseModel):
    """One replica's last sampled images of one version, measured against its reference."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 16 * 1024

    model: str
    version: str
    replica: str
    updated_at: datetime
    samples: int = Field(ge=0)
    """Images in the window (its last N sampled)."""
    outliers: int = Field(ge=0)
    """Of those, the ones farther from the reference than its threshold."""
    mean_distance: float | None = None
    threshold: float
    expected: float = Field(ge=0, le=1)
    """The outlier share of in-distribution inputs (1 - the reference's quantile)."""
    total_samples: int = Field(ge=0)
    """Images this replica measured for the version since it loaded it."""
    dropped: int = Field(default=0, ge=0)
    """Samples not measured because the replica's drift queue was full."""


class DriftScore(BaseModel):
    """A version's drift: its fresh replica windows added up."""

    version: str
    score: float | None
    """Share of the windows' images that are outliers (None: no samples yet). About
    ``expected`` while live inputs look like the validation split; toward 1 as they move."""
    expected: float
    samples: int
    outliers: int
    mean_distance: float | None
    threshold: float
    replicas: int
    updated_at: datetime
    total_samples: int = 0
    """Images the fresh windows' replicas have measured in all (a window keeps the last)."""


class DriftScores:
    """Every replica's drift windows, on one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def put(self, window: DriftWindow) -> None:
        """Write (replace) one replica's window."""
        check_ids(model=window.model, version=window.version, replica=window.replica)
        key = f"drift/{window.model}/{window.version}/{window.replica}.json"
        self.store.put_record(key, window)

    def windows(self, model: str, version: str) -> list[DriftWindow]:
        """The version's windows, fresh or not; a damaged one is logged and skipped."""
        check_ids(model=model, version=version)
        out = []
        for obj in self.store.list(f"drift/{model}/{version}/"):
            names = {"model": model, "version": version}
            try:
                window = self.store.get_record(obj.key, DriftWindow, names=names)
            except NotFoundError:
                continue  # replaced between the listing and the read
            except IntegrityError as exc:
                log.warning("drift window skipped: %s", exc)
                continue
            out.append(window)
        return out

    def score(self, model: str, version: str, *, now: datetime | None = None) -> DriftScore | None:
        """The version's drift over its replicas' fresh windows (None: no fresh window)."""
        now = now or datetime.now(UTC)
        fresh = [
            w
            for w in self.windows(model, version)
            if now - w.updated_at <= timedelta(seconds=MAX_AGE_S)
        ]
        if not fresh:
            return None
        samples = sum(w.samples for w in fresh)
        outliers = sum(w.outliers for w in fresh)
        weighted = [(w.mean_distance, w.samples) for w in fresh if w.mean_distance is not None]
        mean = sum(d * n for d, n in weighted) / samples if samples and weighted else None
        return DriftScore(
            version=version,
            score=outliers / samples if samples else None,
            expected=fresh[0].expected,
            samples=samples,
            outliers=outliers,
            mean_distance=mean,
            threshold=fresh[0].threshold,
            replicas=len(fresh),
            updated_at=max(w.updated_at for w in fresh),
            total_samples=sum(w.total_samples for w in fresh),
        )
