"""Retrain policies, evaluated by the job runner on its own thread (no scheduler process of
their own): which model is due, why, and the job that retrains it.

A pass reads one listing of ``policies/``, and per model with a policy its policy, its state,
its serving alias, (for the label triggers) one listing of its labels and (for the drift
trigger) one listing of its serving version's drift windows: label records are
re-read only when new or changed (``Feedback.items`` with a cache). A firing writes the job's
dataset (base + feedback, ``training.retrain_dataset``) and its record, then the policy's
state: a runner that dies between the two starts no second job for the same firing, because
the queued job counts against ``max_concurrent``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from training.retrain_dataset import write_retrain_dataset
from training.storage.drift_scores import DriftScore, DriftScores
from training.storage.errors import IntegrityError, RefitError
from training.storage.feedback import Feedback, FeedbackItem, judgements
from training.storage.jobs import JobTrigger, TriggerKind
from training.storage.registry import Manifest, Registry
from training.storage.retrain_policies import PolicyState, RetrainPolicies, RetrainPolicy
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)


def live_accuracy(
    items: list[FeedbackItem], version: str, window: int, since: datetime | None = None
) -> tuple[float, int]:
    """Accuracy of ``version`` over its last ``window`` labelled predictions (labelled after
    ``since``, when given; relabels of an image count, each prediction once), and how many
    there were (fewer than ``window``: not enough to judge yet)."""
    judged = [
        j
        for j in judgements(items)
        if j.version == version and (since is None or j.labelled_at > since)
    ][-window:]
    if not judged:
        return 0.0, 0
    return sum(i.label == i.predicted for i in judged) / len(judged), len(judged)


def decide_trigger(
    policy: RetrainPolicy,
    state: PolicyState,
    items: list[FeedbackItem],
    serving_version: str,
    now: datetime,
    drift: DriftScore | None = None,
) -> tuple[TriggerKind, str] | None:
    """Which trigger fires now, with what it measured, or None. The cooldown holds every
    trigger back; then accuracy, drift, new labels and the schedule are looked at, in that
    order. ``drift``: the serving version's, over its replicas' fresh windows."""
    if not policy.enabled:
        return None
    if state.last_fired_at is not None:
        ready_at = state.last_fired_at + timedelta(seconds=policy.cooldown_s)
        if now < ready_at:
            return None
    if policy.accuracy_below is not None:
        # only labels after the last firing: if its retrain was refused, the same version
        # serves and its old labels would fire again every cooldown, forever
        accuracy, n = live_accuracy(
            items, serving_version, policy.window_labels, since=state.last_fired_at
        )
        if n >= policy.window_labels and accuracy < policy.accuracy_below:
            return "accuracy_below", (
                f"live accuracy of {serving_version} {accuracy:.3f} over its last {n} labels "
                f"< accuracy_below {policy.accuracy_below:g}"
            )
    if policy.drift_above is not None and drift is not None and drift.score is not None:
        enough = drift.samples >= policy.drift_samples and _new_drift_evidence(
            policy, state, drift, serving_version
        )
        if enough and drift.score > policy.drift_above:
            return "drift_above", (
                f"input drift of {serving_version} {drift.score:.3f} over {drift.samples} "
                f"sampled images > drift_above {policy.drift_above:g} "
                f"(in distribution: about {drift.expected:g})"
            )
    if policy.every_n_labels is not None:
        # an image's label counts once: when it was first given (or changed), not again
        # each time someone sends the same label
        new = sum(i.new_label_at > state.counted_from for i in items)
        if new >= policy.every_n_labels:
            return "every_n_labels", (
                f"{new} labels since {state.counted_from.isoformat(timespec='seconds')} "
                f">= every_n_labels {policy.every_n_labels}"
            )
    if policy.every_s is not None:
        since = state.last_fired_at or state.counted_from
        if (now - since).total_seconds() >= policy.every_s:
            return "schedule", f"{(now - since).total_seconds():.0f} s since {since.isoformat()}"
    return None


def _new_drift_evidence(
    policy: RetrainPolicy, state: PolicyState, drift: DriftScore, serving_version: str
) -> bool:
    # a refused retrain leaves the same version serving: its drift fires again only on
    # drift_samples images measured since (fewer in all than then: replicas restarted, so
    # everything they measured is new)
    if state.last_fired_at is None or state.drift_version != serving_version:
        return True
    since = drift.total_samples - state.drift_total
    if since < 0:
        since = drift.total_samples
    return since >= policy.drift_samples


def retrain_spec(
    policy: RetrainPolicy, serving: Manifest, dataset: str, *, alias: str
) -> dict[str, Any]:
    """The fine-tune of a firing: from the serving version, with the policy's freeze policy
    (unset: the serving version's), the serving version's augmentation and split settings,
    the policy's epochs, learning rate and batch size."""
    hp = serving.hyperparameters
    spec: dict[str, Any] = {
        "model": serving.model,
        "base": {"version": f"{serving.model}@{serving.version}"},
        "dataset": dataset,
        "epochs": policy.epochs,
        "lr": policy.lr,
        "batch_size": policy.batch_size,
        "alias": alias,
        "promote": True,
    }
    gate = {k: getattr(policy, k) for k in ("min_accuracy", "max_regression")}
    if any(v is not None for v in gate.values()):
        spec["gate"] = {k: v for k, v in gate.items() if v is not None}
    if policy.freeze is not None:
        spec["freeze"] = policy.freeze.model_dump(mode="json")
    elif serving.freeze:
        spec["freeze"] = serving.freeze
    for name in ("augment", "val_fraction", "seed", "optimizer", "weight_decay", "label_smoothing"):
        if name in hp:
            spec[name] = hp[name]
    return spec


@dataclass
class Firing:
    """A policy that fired: the job to create, and the state to store once it exists."""

    job_id: str
    spec: dict[str, Any]
    trigger: JobTrigger
    state: PolicyState


class PolicyWatch:
    """Evaluates every model's retrain policy on one store (the job runner's thread)."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        alias: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``clock``: the time a pass judges at (tests move it past a cooldown)."""
        self.store, self.alias, self.clock = store, alias, clock
        self.policies = RetrainPolicies(store)
        self.registry = Registry(store)
        self.feedback = Feedback(store)
        self.drift = DriftScores(store)
        self._labels: dict[str, tuple[str, FeedbackItem]] = {}
        self._logged: dict[str, str] = {}

    def due(self, active: dict[str, int], new_job_id: Any) -> list[Firing]:
        """The firings of this pass; ``active``: model -> policy jobs queued or running.
        A model whose policy cannot be read or acted on is logged and skipped."""
        out = []
        for model in self.policies.models():
            try:
                firing = self._check(model, active.get(model, 0), new_job_id)
            except RefitError as exc:
                if self._logged.get(model) != str(exc):  # once per cause, not every pass
                    log.warning("retrain policy of %s not evaluated: %s", model, exc)
                    self._logged[model] = str(exc)
                continue
            self._logged.pop(model, None)
            if firing is not None:
                out.append(firing)
        return out

    def _state(self, model: str, now: datetime) -> PolicyState:
        try:
            state = self.policies.state(model)
        except IntegrityError as exc:
            # unknown when it last fired: assume just now, so the cooldown holds it back
            log.warning("%s; starting it again with the cooldown from now", exc)
            state = None
            fresh = PolicyState(counted_from=now, last_fired_at=now)
        else:
            fresh = PolicyState(counted_from=now)
        if state is None:  # first seen: labels and the schedule count from now
            self.policies.set_state(model, fresh)
            state = fresh
        return state

    def _check(self, model: str, active: int, new_job_id: Any) -> Firing | None:
        policy = self.policies.get(model)
        if policy is None or not policy.enabled:
            return None
        now = self.clock()
        state = self._state(model, now)
        if active >= policy.max_concurrent:
            return None
        serving = self.registry.serving_manifest(model, self.alias)
        items = (
            self.feedback.items(model, self._labels)
            if policy.every_n_labels or policy.accuracy_below
            else []
        )
        drift = (
            self.drift.score(model, serving.version, now=now)
            if policy.drift_above is not None
            else None
        )
        decision = decide_trigger(policy, state, items, serving.version, now, drift)
        if decision is None:
            return None
        kind, detail = decision
        job_id = new_job_id()
        base = policy.base_dataset or serving.dataset.get("uri")
        try:
            uri, contents = write_retrain_dataset(
                self.store,
                model,
                job_id,
                base_uri=base,
                val_fraction=float(serving.hyperparameters.get("val_fraction", 0.2)),
                seed=int(serving.hyperparameters.get("seed", 0)),
            )
        except RefitError as exc:  # e.g. the base dataset is gone: no job, and say why
            failed = state.model_copy(
                update={"last_fired_at": now, "last_error": f"{kind}: {detail}; {exc}"}
            )
            self.policies.set_state(model, failed)
            raise
        trigger = JobTrigger(
            kind=kind,
            detail=detail,
            fired_at=now.isoformat(),
            serving_version=serving.version,
            dataset=contents,
        )
        fired = state.model_copy(
            update={
                "counted_from": now,
                "last_fired_at": now,
                "drift_version": serving.version,
                "drift_total": drift.total_samples if drift else 0,
                "last_job_id": job_id,
                "fired": state.fired + 1,
                "last_error": None,
            }
        )
        log.info("retrain policy of %s fired (%s): %s", model, kind, detail)
        return Firing(job_id, retrain_spec(policy, serving, uri, alias=self.alias), trigger, fired)

    def fired(self, model: str, firing: Firing) -> None:
        """Store the policy's state once its job exists."""
        self.policies.set_state(model, firing.state)
