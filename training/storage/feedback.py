"""Labels sent back for served predictions, as a dataset a fine-tune can name.

Layout (under the configured prefix)::

    feedback/{model}/images/{sha256}.{ext}     a labelled image, by content: one copy each
    feedback/{model}/labels/{sha256}.json      its label record: the latest label (what is
                                               trained on) and the earlier ones (history)
    feedback/{model}/quality.json              live-quality counters (``quality_index``)
    datasets/feedback-{model}.jsonl            the dataset: a JSONL manifest of every label,
                                               rewritten by :meth:`Feedback.write_dataset`

The train/val assignment of an image is a function of its content hash (``val_fraction`` of
the hash space is val), so it never changes between snapshots, and an image labelled twice
stays in one split. An image lent to the other split (its class had none there) stays lent:
once it validated a version it is never trained on, and the other way round.

A label of a captured prediction is also a judgement of the version that answered it: every
judgement is kept (the record's own and its history), so a relabel never erases what an
earlier version was judged on; relabelling the same prediction corrects its judgement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.storage.captures import ImageKind
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, SpecError
from training.storage.ids import check_ids
from training.storage.s3 import ObjectStore

_SHA = re.compile(r"[0-9a-f]{64}")
_LABEL_KEY = re.compile(r"^feedback/([^/]+)/labels/([0-9a-f]{64})\.json$")
Split = Literal["train", "val"]


MAX_HISTORY = 20
"""Earlier labels a record keeps (the oldest dropped beyond it)."""


class Judgement(BaseModel):
    """One label as it was given: for a captured prediction, a judgement of its version."""

    model_config = ConfigDict(extra="forbid")

    label: str
    labelled_at: datetime
    prediction_id: str | None = None
    index: int | None = None
    predicted: str | None = None
    predicted_score: float | None = None
    version: str | None = None

    @property
    def judged(self) -> bool:
        """Whether it judged a served prediction (not an uploaded image's label)."""
        return self.predicted is not None and self.version is not None

    @property
    def prediction_key(self) -> str | None:
        """The prediction it judged (one judgement per prediction: the latest label)."""
        return f"{self.prediction_id}:{self.index}" if self.prediction_id else None


class FeedbackItem(BaseModel):
    """One labelled image: the true label, where it came from, and (for a captured
    prediction) what the model had answered."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 64 * 1024
    """With its history of at most ``MAX_HISTORY`` labels, a few KB."""

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
    predicted_score: float | None = None
    """The top-1 score of that answer."""
    label_since: datetime | None = None
    """When the image first got its current label (a relabel with the same label keeps it):
    what ``every_n_labels`` counts, so a repeated label is not new evidence."""
    lent: bool = False
    """Its split is not its hash's: it was lent to a class's empty split, and stays."""
    history: list[Judgement] = Field(default_factory=list)
    """Earlier labels of the image, oldest first (at most ``MAX_HISTORY``)."""

    def judgement(self) -> Judgement:
        """This record's own label as a :class:`Judgement`."""
        return Judgement(
            label=self.label,
            labelled_at=self.labelled_at,
            prediction_id=self.prediction_id,
            index=self.index,
            predicted=self.predicted,
            predicted_score=self.predicted_score,
            version=self.version,
        )

    @property
    def new_label_at(self) -> datetime:
        """When the image's current label was first given."""
        return self.label_since or self.labelled_at


def judgements(items: list[FeedbackItem]) -> list[Judgement]:
    """Every judgement of a served prediction in the records (history included), one per
    prediction (its latest label), oldest first."""
    latest: dict[str, Judgement] = {}
    for item in items:
        for j in (*item.history, item.judgement()):
            key = j.prediction_key
            newer = key is not None and (
                key not in latest or j.labelled_at >= latest[key].labelled_at
            )
            if j.judged and newer:
                latest[str(key)] = j
    return sorted(latest.values(), key=lambda j: j.labelled_at)


def replaced_judgement(stored: FeedbackItem, previous: FeedbackItem | None) -> Judgement | None:
    """The judgement a new label takes back: the latest earlier label of the same
    prediction (a relabel corrects it), or None."""
    key = stored.judgement().prediction_key
    if previous is None or key is None:
        return None
    earlier = [j for j in (*previous.history, previous.judgement()) if j.prediction_key == key]
    return max(earlier, key=lambda j: j.labelled_at) if earlier else None


def merged(item: FeedbackItem, previous: FeedbackItem | None) -> FeedbackItem:
    """A new label on top of the image's record: the previous label goes to the history,
    the split (lent or not) stays, and ``label_since`` moves only when the label changed."""
    if previous is None:
        return item.model_copy(update={"label_since": item.labelled_at})
    same = previous.label == item.label
    return item.model_copy(
        update={
            "history": [*previous.history, previous.judgement()][-MAX_HISTORY:],
            "split": previous.split,
            "lent": previous.lent,
            "label_since": previous.new_label_at if same else item.labelled_at,
        }
    )


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

    def __init__(
        self,
        store: ObjectStore,
        image_written: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        """``image_written(key, etag, data)``: told of every image this writes (the node's
        image cache keeps it, so the retrain the label leads to reads it from disk)."""
        self.store = store
        self.image_written = image_written

    @staticmethod
    def _base(model: str) -> str:
        check_ids(model=model)
        return f"feedback/{model}"

    def quality_key(self, model: str) -> str:
        """Where the model's live-quality counters are kept (``quality_index``)."""
        return f"{self._base(model)}/quality.json"

    def image_key(self, item: FeedbackItem) -> str:
        """Where a labelled image is stored."""
        return f"{self._base(item.model)}/images/{item.sha256}.{item.image}"

    def get(self, model: str, sha256: str) -> FeedbackItem | None:
        """The label record of an image, or None when it was never labelled."""
        if not _SHA.fullmatch(sha256):
            raise SpecError("not a sha256", field="sha256")
        key = self._record_key(model, sha256)
        names = {"model": model, "sha256": sha256}
        try:
            return self.store.get_record(key, FeedbackItem, names=names)
        except NotFoundError:
            return None

    def _record_key(self, model: str, sha256: str) -> str:
        return f"{self._base(model)}/labels/{sha256}.json"

    def put(self, item: FeedbackItem, image: bytes) -> tuple[FeedbackItem, FeedbackItem | None]:
        """Store a labelled image: the image once (by content), then its label record (the
        latest label on top of the earlier ones, :func:`merged`). Returns the record stored
        and the one it replaced, if any."""
        if content_hash(image) != item.sha256:
            raise IntegrityError("the image does not match its sha256")
        previous = self.get(item.model, item.sha256)
        image_key = self.image_key(item)
        if previous is None or previous.image != item.image or not self.store.exists(image_key):
            etag = self.store.put_bytes(image_key, image)
            if self.image_written is not None:
                self.image_written(image_key, etag, image)
        stored = merged(item, previous)
        self.store.put_record(self._record_key(item.model, item.sha256), stored)
        return stored, previous

    def _lend(self, item: FeedbackItem) -> None:
        """Store that an image was lent to the other split (it stays there), unless its
        record changed meanwhile (a new label: its next snapshot lends again if needed)."""
        key = self._record_key(item.model, item.sha256)
        try:
            current, etag = self.store.get_record_with_etag(key, FeedbackItem)
        except (NotFoundError, IntegrityError):
            return
        if current.label != item.label or current.lent:
            return
        lent = current.model_copy(update={"split": item.split, "lent": True})
        with contextlib.suppress(ConflictError):
            self.store.put_record(key, lent, if_match=etag)

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
        for item in items:
            if item.lent:
                self._lend(item)
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
    """Every class in both splits: a class whose images all sit in one split lends its
    lowest-hash image to the other (returned with ``lent`` set: the snapshot's writer stores
    it, and it stays lent); a class with one image is left out, and named."""
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
            lent = group[0].model_copy(update={"split": other, "lent": True})
            group = [lent, *group[1:]]
        out += group
    return out, skipped


def summary(items: list[FeedbackItem]) -> dict[str, dict[str, int]]:
    """Labels per class and split."""
    counts: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
    for i in items:
        counts[i.split][i.label] += 1
    return {split: dict(sorted(c.items())) for split, c in counts.items()}
