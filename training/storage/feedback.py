"""Labels sent back for served predictions, as a dataset a fine-tune can name.

Layout (under the configured prefix)::

    feedback/{model}/images/{sha256}.{ext}     a labelled image, by content: one copy each
    feedback/{model}/labels/{sha256}.json      its label record (the latest label wins)
    datasets/feedback-{model}.jsonl            the dataset: a JSONL manifest of every label,
                                               rewritten by :meth:`Feedback.write_dataset`

The train/val assignment of an image is a function of its content hash (``val_fraction`` of
the hash space is val), so it never changes between snapshots, and an image labelled twice
stays in one split.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.storage.captures import ImageKind
from training.storage.errors import IntegrityError, NotFoundError, SpecError
from training.storage.ids import is_id
from training.storage.s3 import ObjectStore

MAX_RECORD_BYTES = 64 * 1024
_SHA = re.compile(r"[0-9a-f]{64}")
_LABEL_KEY = re.compile(r"^feedback/([^/]+)/labels/([0-9a-f]{64})\.json$")
Split = Literal["train", "val"]


class FeedbackItem(BaseModel):
    """One labelled image: the true label, where it came from, and (for a captured
    prediction) what the model had answered."""

    model_config = ConfigDict(extra="forbid")

    model: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    image: ImageKind
    label: str = Field(min_length=1, max_length=200)
    split: Split
    labelled_at: datetime
    new_class: bool = False
    """The label was not a class of the serving version (allowed by the request)."""
    prediction_id: str | None = None
    index: int | None = None
    predicted: str | None = None
    """The top-1 label the model answered, when the label names a captured prediction."""
    version: str | None = None
    """The version that answered it."""


def split_of(sha256: str, val_fraction: float) -> Split:
    """The split an image belongs to, from its content hash alone (stable)."""
    return "val" if int(sha256[:8], 16) < val_fraction * 0x1_0000_0000 else "train"


def content_hash(data: bytes) -> str:
    """The sha256 an image is stored and deduplicated under."""
    return hashlib.sha256(data).hexdigest()


def dataset_key(model: str) -> str:
    """Where a model's feedback dataset (JSONL manifest) is written."""
    return f"datasets/feedback-{model}.jsonl"


class Feedback:
    """Labelled images of every model, on one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def _base(model: str) -> str:
        if not is_id(model):
            raise SpecError(f"{model!r} is not a valid id", field="model")
        return f"feedback/{model}"

    def image_key(self, item: FeedbackItem) -> str:
        """Where a labelled image is stored."""
        return f"{self._base(item.model)}/images/{item.sha256}.{item.image}"

    def get(self, model: str, sha256: str) -> FeedbackItem | None:
        """The label record of an image, or None when it was never labelled."""
        if not _SHA.fullmatch(sha256):
            raise SpecError("not a sha256", field="sha256")
        key = f"{self._base(model)}/labels/{sha256}.json"
        try:
            raw = self.store.get_bytes(key, max_bytes=MAX_RECORD_BYTES)
        except NotFoundError:
            return None
        except ValueError as exc:
            raise IntegrityError(f"feedback record {key}: {exc}") from None
        try:
            item = FeedbackItem.model_validate_json(raw)
        except ValidationError as exc:
            raise IntegrityError(f"feedback record {key} is damaged: {exc}") from None
        if (item.model, item.sha256) != (model, sha256):
            raise IntegrityError(f"feedback record {key} names another image")
        return item

    def put(self, item: FeedbackItem, image: bytes) -> FeedbackItem | None:
        """Store a labelled image: the image once (by content), then its label record (the
        latest label wins). Returns the record it replaced, if any."""
        if content_hash(image) != item.sha256:
            raise IntegrityError("the image does not match its sha256")
        base = self._base(item.model)
        previous = self.get(item.model, item.sha256)
        image_key = self.image_key(item)
        if previous is None or previous.image != item.image or not self.store.exists(image_key):
            self.store.put_bytes(image_key, image)
        self.store.put_json(f"{base}/labels/{item.sha256}.json", item.model_dump(mode="json"))
        return previous

    def items(
        self, model: str, cache: dict[str, tuple[str, FeedbackItem]] | None = None
    ) -> list[FeedbackItem]:
        """Every label record of a model, by content hash (damaged records are skipped: a
        dataset snapshot must not fail on one bad object). ``cache`` (key -> ETag and item,
        kept by the caller between calls) makes a repeated call one listing plus a read of
        each new or changed record only."""
        out = []
        seen = set()
        for obj in self.store.list(f"{self._base(model)}/labels/"):
            m = _LABEL_KEY.fullmatch(obj.key)
            if m is None or m.group(1) != model:
                continue
            seen.add(obj.key)
            known = cache.get(obj.key) if cache is not None else None
            if known is not None and known[0] == obj.etag:
                out.append(known[1])
                continue
            try:
                item = self.get(model, m.group(2))
            except IntegrityError:
                continue
            if item is not None:
                out.append(item)
                if cache is not None:
                    cache[obj.key] = (obj.etag, item)
        if cache is not None:
            for key in [k for k in cache if k.startswith(f"feedback/{model}/") and k not in seen]:
                del cache[key]
        return out

    def write_dataset(self, model: str) -> tuple[str, list[FeedbackItem], list[str]]:
        """Write the model's feedback dataset and return its ``s3://`` URI, the items in it
        (with the split each was written in) and the classes left out (one image only: a
        class must be in both splits to be trained and evaluated)."""
        items, skipped = trainable_splits(self.items(model))
        lines = [
            json.dumps(
                {
                    "uri": self.store.uri(self.image_key(i)),
                    "label": i.label,
                    "split": i.split,
                },
                sort_keys=True,
            )
            for i in items
        ]
        key = dataset_key(model)
        self.store.put_bytes(
            key, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson"
        )
        return self.store.uri(key), items, skipped


def trainable_splits(items: list[FeedbackItem]) -> tuple[list[FeedbackItem], list[str]]:
    """Every class in both splits: a class whose images all hashed into one split lends its
    lowest-hash image to the other (until an image of its own lands there, then every image
    keeps its hash split for good); a class with one image is left out, and named."""
    by_class: dict[str, list[FeedbackItem]] = {}
    for i in sorted(items, key=lambda i: i.sha256):
        by_class.setdefault(i.label, []).append(i)
    out: list[FeedbackItem] = []
    skipped = []
    for label, group in sorted(by_class.items()):
        if len(group) < 2:
            skipped.append(label)
            continue
        splits = {i.split for i in group}
        if len(splits) == 1:
            other: Split = "train" if "val" in splits else "val"
            group = [group[0].model_copy(update={"split": other}), *group[1:]]
        out += group
    return out, skipped


def summary(items: list[FeedbackItem]) -> dict[str, dict[str, int]]:
    """Labels per class and split."""
    counts: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
    for i in items:
        counts[i.split][i.label] += 1
    return {split: dict(sorted(c.items())) for split, c in counts.items()}
