"""Retrain policies on the object store: ``policies/{model}/retrain.json``.

A policy says when a model is fine-tuned again from its serving version, on its base dataset
plus its feedback dataset: every N new labels, when live accuracy over the last M labels falls
below a threshold, or on a schedule; never sooner than a cooldown after the last run it
started, with at most a few runs at once. The validation refuses a policy that could retrain in
a loop (no cooldown, or a schedule shorter than it).
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.freeze_spec import FreezePolicy
from training.storage.errors import NotFoundError
from training.storage.ids import check_ids, is_id
from training.storage.s3 import ObjectStore

MIN_COOLDOWN_S = 300.0
"""Shortest cooldown: a retrain whose trigger still holds after it (accuracy the new version
cannot lift) would otherwise start again at once, for ever."""


class RetrainPolicy(BaseModel):
    """When to fine-tune a model again, and how (the job's settings; model, base version and
    datasets are filled in when it fires)."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 64 * 1024

    enabled: bool = True
    every_n_labels: int | None = Field(default=None, ge=10, le=1_000_000)
    """Fire once this many labels arrived since the last run this policy started."""
    accuracy_below: float | None = Field(default=None, gt=0, lt=1)
    """Fire when live accuracy over the last ``window_labels`` labels is below this."""
    window_labels: int = Field(default=200, ge=20, le=100_000)
    """Labels the accuracy trigger looks at (it waits until it has this many)."""
    drift_above: float | None = Field(default=None, gt=0, lt=1)
    """Fire when the serving version's input drift (the share of sampled live images whose
    features lie beyond its reference threshold; about 0.05 in distribution) exceeds this."""
    drift_samples: int = Field(default=200, ge=20, le=100_000)
    """Sampled images the drift trigger waits for (over the replicas' fresh windows)."""
    every_s: float | None = Field(default=None, ge=3600)
    """Fire on a schedule: this long after the last run this policy started."""
    cooldown_s: float = Field(default=3600.0, ge=MIN_COOLDOWN_S)
    """Never fire sooner than this after the last run this policy started."""
    max_concurrent: int = Field(default=1, ge=1, le=4)
    """Runs of this policy at once (the job runner's own limits apply as well)."""
    base_dataset: str | None = Field(default=None, max_length=1024)
    """The dataset of the original fine-tune (``s3://`` under the bucket and prefix); the
    feedback dataset is trained on together with it, so old classes are not forgotten."""
    freeze: FreezePolicy | None = None
    """What the retrain trains (unset: what trained the serving version). ``head_only``
    (feature cache on) retrains in seconds: the trunk's features of images seen before are
    stored, so only the head is fitted, on new images' features and stored ones."""
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """The gate of its retrains: top-1 on the validation split at least this (unset: the
    settings' ``REFIT_TRAINING__MIN_ACCURACY``)."""
    max_regression: float | None = Field(default=None, ge=0, le=1)
    """The gate of its retrains: worse than the serving version by at most this, overall and
    on each source (unset: ``REFIT_TRAINING__MAX_REGRESSION``)."""
    epochs: int = Field(default=5, ge=1, le=1000)
    lr: float = Field(default=1e-3, gt=0, le=10)
    batch_size: int = Field(default=32, ge=1, le=4096)

    @model_validator(mode="after")
    def _a_trigger_that_cannot_loop(self) -> Self:
        triggers = (self.every_n_labels, self.accuracy_below, self.drift_above, self.every_s)
        if self.enabled and not any(triggers):
            raise ValueError(
                "set at least one trigger: every_n_labels, accuracy_below, drift_above, every_s"
            )
        if self.every_s is not None and self.every_s < self.cooldown_s:
            raise ValueError(
                f"every_s ({self.every_s:g}) is shorter than cooldown_s ({self.cooldown_s:g})"
            )
        return self


class PolicyState(BaseModel):
    """What the job runner remembers of a policy between passes (and restarts):
    ``policies/{model}/state.json``, written by the runner alone."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 64 * 1024

    counted_from: datetime
    """Labels after this count toward ``every_n_labels``; the schedule runs from it too (the
    time the runner first saw the policy, then the time it last fired)."""
    last_fired_at: datetime | None = None
    drift_version: str | None = None
    """The serving version when the policy last fired, and how many images its replicas had
    measured for drift then (``drift_total``): ``drift_above`` fires again for the same
    version only on ``drift_samples`` images measured since."""
    drift_total: int = 0
    last_job_id: str | None = None
    fired: int = 0
    last_error: str | None = None
    """Why the last firing started no job (its dataset could not be written); the cooldown
    runs from that attempt as from a run."""


class RetrainPolicies:
    """Every model's retrain policy, on one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def _key(model: str) -> str:
        check_ids(model=model)
        return f"policies/{model}/retrain.json"

    def get(self, model: str) -> RetrainPolicy | None:
        """The model's policy, or None; a damaged object is an IntegrityError."""
        try:
            return self.store.get_record(self._key(model), RetrainPolicy)
        except NotFoundError:
            return None

    def models(self) -> list[str]:
        """The models that have a policy (one listing)."""
        out = []
        for obj in self.store.list("policies/"):
            model, _, name = obj.key.removeprefix("policies/").partition("/")
            if name == "retrain.json" and is_id(model):
                out.append(model)
        return sorted(out)

    def state(self, model: str) -> PolicyState | None:
        """The runner's state of the model's policy, or None (never seen); IntegrityError
        when damaged."""
        key = self._key(model).replace("retrain.json", "state.json")
        try:
            return self.store.get_record(key, PolicyState)
        except NotFoundError:
            return None

    def set_state(self, model: str, state: PolicyState) -> None:
        """Store the runner's state of the model's policy."""
        key = self._key(model).replace("retrain.json", "state.json")
        self.store.put_record(key, state)

    def set(self, model: str, policy: RetrainPolicy) -> RetrainPolicy:
        """Store the model's policy (replacing the previous one)."""
        self.store.put_record(self._key(model), policy)
        return policy

    def delete(self, model: str) -> None:
        """Remove the model's policy (nothing fires for it any more)."""
        self.store.delete(self._key(model))
