"""A version's logits on images, kept on the store per model content and image content, so
that scoring the serving version on a retrain's validation split forwards only the images
it has not been run on yet.

A loop retrain's validation split is mostly the last one's (the base dataset's split is fixed
by the serving version's seed; the feedback split grows), and the serving version is the
last retrain's candidate: its logits on that split came out of its own best epoch's
validation pass. So the candidate's logits are remembered when it publishes, the serving
version's whenever images had to be forwarded, and a retrain scores the serving version from
them plus a pass over the new images only.

The packs are the feature store's (``training.feature_store``: safetensors, written once,
bounded reads, damaged ones skipped), under :func:`outputs_id`: the sha256 of the model's
stage digests (every tensor, head included), its backbone and its preprocessing. Logits are
fp32 from an eval-mode pass; the scores made from them equal a fresh pass within float
rounding (tested).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from training.data import Sample, shared_cache
from training.feature_store import FeatureStore
from training.job_settings import TrainingSettings
from training.preprocess import eval_transform
from training.preprocessing_spec import Preprocessing
from training.scoring import Scores, outputs_on, score_logits
from training.stage_digests import prefix_digests
from training.storage.registry import StageDigest
from training.storage.s3 import ObjectStore
from training.version_crops import capped_dataset

FORMAT = 1
"""Part of every outputs id: a change of how logits are made bumps it."""


def outputs_id(stages: list[StageDigest], backbone: str, pre: Preprocessing) -> str:
    """The content id of a model's logits: all its stages' digests, its backbone and the
    evaluation preprocessing (fp32)."""
    meta = {
        "format": FORMAT,
        "outputs": "logits",
        "backbone": backbone,
        "model": prefix_digests(stages)[-1] if stages else "",
        "pre": pre.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def content_shas(
    store: ObjectStore,
    samples: list[Sample],
    pre: Preprocessing,
    kept: FeatureStore,
    t: TrainingSettings,
) -> dict[str, str] | None:
    """The content sha256 of every sample (by key): those whose key, ETag and size were
    hashed before from the names packs, the rest from their bytes (the job's byte cache
    holds them after training), named for next time. None when one cannot be fetched."""
    keys, cache = [s.key for s in samples], shared_cache()
    known, listed = kept.known_contents(keys, cache.know(store, keys) if cache else None)
    missing = [s for s in samples if s.key not in known]
    try:
        hashed = dict(
            zip(
                (s.key for s in missing),
                capped_dataset(store, missing, eval_transform(pre), t).sha256s(),
                strict=True,
            )
        )
    except ValueError:  # gone or too large: scoring on the images reports it
        return None
    kept.add_names({listed[k]: sha for k, sha in hashed.items() if k in listed})
    return {**known, **hashed}


class ServedOutputs:
    """Logits of published versions on the store (off when ``feature_store_mb`` is 0, or
    not ``enabled``)."""

    def __init__(
        self, store: ObjectStore, training: TrainingSettings, *, enabled: bool = True
    ) -> None:
        self.store, self.training = store, training
        mb = training.feature_store_mb if enabled else 0
        self.kept = FeatureStore(store, max_bytes=mb * 1024 * 1024) if mb else None

    @property
    def enabled(self) -> bool:
        """Whether logits are kept and used."""
        return self.kept is not None

    def score(
        self,
        model: nn.Module,
        stages: list[StageDigest],
        backbone: str,
        pre: Preprocessing,
        val: list[Sample],
        classes: list[str],
    ) -> tuple[Scores, int] | None:
        """``model`` (a published version with these stage digests) scored on ``val``: its
        stored logits where it has them, a pass over the other images (remembered), and how
        many images that pass forwarded; None when the store is off or an image cannot be
        hashed (score on the images)."""
        if self.kept is None or not stages or not val:
            return None
        shas = content_shas(self.store, val, pre, self.kept, self.training)
        if shas is None:
            return None
        key = outputs_id(stages, backbone, pre)
        found = self.kept.lookup(key, set(shas.values()))
        if any(row.shape != (len(classes),) for row in found.values()):
            found = {}  # not this model's logits (cannot happen for equal content): recompute
        missing = [s for s in val if shas[s.key] not in found]
        if missing:
            _, logits = outputs_on(
                model,
                backbone,
                missing,
                store=self.store,
                preprocessing=pre,
                classes=classes,
                training=self.training,
            )
            if logits.shape[0] != len(missing):
                return None
            fresh = {shas[s.key]: logits[n] for n, s in enumerate(missing)}
            self.kept.add(key, fresh)
            found.update(fresh)
        rows = torch.stack([found[shas[s.key]] for s in val])
        return score_logits(val, rows, classes), len(missing)

    def remember(
        self,
        stages: list[StageDigest],
        backbone: str,
        pre: Preprocessing,
        val: list[Sample],
        logits: torch.Tensor,
    ) -> None:
        """Keep a new version's logits on ``val`` (in its order, from its validation pass)
        for the retrain that will score it as the serving version. Best effort."""
        if self.kept is None or not stages or len(val) != logits.shape[0]:
            return
        shas = content_shas(self.store, val, pre, self.kept, self.training)
        if shas is not None:
            rows = {shas[s.key]: logits[n].float() for n, s in enumerate(val)}
            self.kept.add(outputs_id(stages, backbone, pre), rows)


__all__ = ["ServedOutputs", "content_shas", "outputs_id"]
