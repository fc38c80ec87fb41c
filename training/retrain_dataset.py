"""The dataset a retrain policy's job trains on: the base dataset plus the model's feedback.

Written as one JSONL manifest, ``datasets/retrain-{model}-{job_id}.jsonl``, whose every line
names its ``source`` (``base`` or ``feedback``) and its split:

* the base dataset keeps the split the serving version was gated on (indexed with that
  version's ``val_fraction`` and ``seed``), so the new version never trains on the images
  the old one was validated on, and the gate can score both on them;
* the feedback dataset is snapshotted first (``datasets/feedback-{model}.jsonl``) and keeps its
  hash-stable split; an image in both takes its feedback label (the latest word on it).

The base of a second retrain is the first retrain's manifest: its feedback lines are dropped
(the new snapshot holds them, with their latest labels), its base lines kept.
"""

from __future__ import annotations

import json
from typing import Any

from training.data import index_dataset
from training.storage.feedback import Feedback
from training.storage.ids import is_id
from training.storage.s3 import ObjectStore


def retrain_dataset_key(model: str, job_id: str) -> str:
    """Where the dataset of one retrain job is written."""
    if not (is_id(model) and is_id(job_id)):
        raise ValueError("model and job id must be ids")
    return f"datasets/retrain-{model}-{job_id}.jsonl"


def write_retrain_dataset(
    store: ObjectStore,
    model: str,
    job_id: str,
    *,
    base_uri: str | None,
    val_fraction: float,
    seed: int,
) -> tuple[str, dict[str, Any]]:
    """Write the job's manifest; returns its ``s3://`` URI and what is in it (images per
    source and split, feedback classes left out for having one image). DataError when the
    base dataset cannot be indexed."""
    feedback = Feedback(store)
    _, items, skipped = feedback.write_dataset(model)
    lines: dict[str, dict[str, str]] = {}
    if base_uri is not None:
        index = index_dataset(store, base_uri, val_fraction=val_fraction, seed=seed)
        for split, samples in (("train", index.train), ("val", index.val)):
            for s in samples:
                if s.source == "feedback":  # an earlier snapshot: superseded by this one
                    continue
                uri = store.uri(s.key)
                lines[uri] = {
                    "uri": uri,
                    "label": index.classes[s.label],
                    "split": split,
                    "source": "base",
                }
    for i in items:
        uri = store.uri(feedback.image_key(i))
        lines[uri] = {"uri": uri, "label": i.label, "split": i.split, "source": "feedback"}
    counts: dict[str, dict[str, int]] = {}
    for line in lines.values():
        per = counts.setdefault(line["source"], {"train": 0, "val": 0})
        per[line["split"]] += 1
    key = retrain_dataset_key(model, job_id)
    body = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines.values())
    store.put_bytes(key, body.encode(), content_type="application/x-ndjson")
    return store.uri(key), {
        "uri": store.uri(key),
        "base": base_uri,
        "images": dict(sorted(counts.items())),
        "feedback_classes_left_out": skipped,
    }
