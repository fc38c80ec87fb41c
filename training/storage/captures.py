"""Captured predictions on the object store: what a served model saw, kept for labelling.

Layout (under the configured prefix, beside ``models/`` and ``jobs/``)::

    captures/{model}/policy.json                              the model's capture policy
    captures/{model}/items/{prediction_id}/{index}.{ext}      the request's image, as sent
    captures/{model}/items/{prediction_id}/{index}.json       its record: written LAST

A capture exists once its record exists (the image is written first, as a version's weights
are before its manifest). Prediction ids sort by time, so a listing walks captures oldest
first. Every name is an id (``re.fullmatch``), never a path from a client.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.storage.errors import IntegrityError, NotFoundError
from training.storage.ids import check_ids, is_prediction_id
from training.storage.s3 import ObjectStore

ImageKind = Literal["jpg", "png", "webp"]
CaptureReason = Literal["random", "low_confidence", "low_margin"]
_ITEM = re.compile(r"^captures/([^/]+)/items/([^/]+)/(\d+)\.json$")


class CapturePolicy(BaseModel):
    """Which predictions of a model are kept for labelling. A prediction is a candidate when
    any rule picks it (a random draw, or low confidence); the caps then bound how many
    candidates are kept per clock hour, in all and per predicted class. All off: nothing is
    captured (the default)."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 64 * 1024
    """A stored one is a few hundred bytes; a larger one was not written by Refit."""

    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of predictions kept at random (0: none, 1: every one)."""
    low_confidence_below: float | None = Field(default=None, gt=0.0, le=1.0)
    """Keep a prediction whose top-1 score is below this."""
    margin_below: float | None = Field(default=None, gt=0.0, le=1.0)
    """Keep a prediction whose top-1 and top-2 scores differ by less than this."""
    max_per_hour: int = Field(default=1000, ge=0)
    """Most captures per clock hour (UTC), over all classes."""
    max_per_class_per_hour: int | None = Field(default=100, ge=0)
    """Most captures per clock hour of one predicted class (unset: no per-class cap)."""

    @property
    def enabled(self) -> bool:
        """Whether any rule can pick a prediction."""
        return (
            self.rate > 0
            or self.low_confidence_below is not None
            or (self.margin_below is not None)
        )


class CapturedLabel(BaseModel):
    """One label and its score, as the prediction answered it."""

    label: str
    score: float


class CaptureRecord(BaseModel):
    """One captured image's prediction: what answered, what it said, why it was kept."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 64 * 1024
    """A stored one is a few hundred bytes; a larger one was not written by Refit."""

    model: str
    prediction_id: str
    index: int = Field(ge=0)
    version: str
    created_at: datetime
    reason: CaptureReason
    image: ImageKind
    image_bytes: int = Field(ge=0)
    predictions: list[CapturedLabel]


class Captures:
    """Captured predictions and capture policies of every model, on one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def _item(model: str, prediction_id: str, index: int) -> str:
        check_ids(model=model, prediction_id=prediction_id)
        return f"captures/{model}/items/{prediction_id}/{int(index)}"

    # --- policies --------------------------------------------------------------------------
    def policy(self, model: str) -> CapturePolicy | None:
        """The model's stored policy, or None when it has none (the settings' default
        applies). A damaged policy object is an IntegrityError, not a crash."""
        check_ids(model=model)
        try:
            return self.store.get_record(f"captures/{model}/policy.json", CapturePolicy)
        except NotFoundError:
            return None

    def set_policy(self, model: str, policy: CapturePolicy) -> CapturePolicy:
        """Store the model's policy (replaces the previous one)."""
        check_ids(model=model)
        self.store.put_record(f"captures/{model}/policy.json", policy)
        return policy

    # --- captures --------------------------------------------------------------------------
    def put(self, record: CaptureRecord, image: bytes) -> None:
        """Store one capture: the image, then its record (the record makes it exist). Each
        key is new (a prediction id is never reused): conditional writes, never overwrites."""
        key = self._item(record.model, record.prediction_id, record.index)
        kind = record.image
        self.store.put_bytes(
            f"{key}.{kind}", image, content_type=f"image/{'jpeg' if kind == 'jpg' else kind}"
        )
        self.store.put_record(f"{key}.json", record, if_none_match=True)

    def get(self, model: str, prediction_id: str, index: int = 0) -> CaptureRecord:
        """One capture's record; NotFoundError when it was not captured (or does not exist),
        IntegrityError when the stored record is damaged."""
        key = self._item(model, prediction_id, index)
        names = {"model": model, "prediction_id": prediction_id, "index": index}
        try:
            return self.store.get_record(f"{key}.json", CaptureRecord, names=names)
        except NotFoundError:
            raise NotFoundError(
                f"no captured prediction {prediction_id!r} (image {index}) of model {model!r}",
                field="prediction_id",
            ) from None

    def image(self, record: CaptureRecord, *, max_bytes: int) -> bytes:
        """A capture's image bytes (at most ``max_bytes``: the request cap it was sent under)."""
        key = self._item(record.model, record.prediction_id, record.index)
        try:
            return self.store.get_bytes(f"{key}.{record.image}", max_bytes=max_bytes)
        except ValueError as exc:
            raise IntegrityError(f"capture image {key}: {exc}") from None

    def list(
        self, model: str, *, after: str | None = None, limit: int = 100
    ) -> Iterator[tuple[str, int]]:
        """``(prediction_id, index)`` of the model's captures, oldest first, after the
        prediction id ``after`` (exclusive): at most ``limit`` predictions, each with all of
        its captured images (so a page never ends inside one prediction)."""
        check_ids(model=model)
        if after is not None:
            check_ids(after=after)
        seen: list[str] = []
        base = f"captures/{model}/items/"
        # "/~" sorts after every key of that prediction: the listing starts past it
        for obj in self.store.list(base, start_after=f"{base}{after}/~" if after else None):
            m = _ITEM.fullmatch(obj.key)
            if m is None or not is_prediction_id(m.group(2)) or (after and m.group(2) <= after):
                continue
            pid = m.group(2)
            if not seen or seen[-1] != pid:
                if len(seen) >= limit:
                    return
                seen.append(pid)
            yield pid, int(m.group(3))


def hour_of(moment: datetime) -> str:
    """The clock hour (UTC) that per-hour caps count in: ``2026120306``."""
    return f"{moment.astimezone(UTC):%Y%m%d%H}"
