"""When a retrain policy fires (pure decisions), and what a firing writes on a real
SeaweedFS: a dataset of the base split plus feedback, a job with its trigger, the state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest

from conftest import png_bytes, publish_tiny_model, write_imagefolder
from service.control.retrain_triggers import (
    PolicyWatch,
    decide_trigger,
    live_accuracy,
    retrain_spec,
)
from training.data import index_dataset
from training.storage.drift_scores import DriftScore, DriftScores, DriftWindow
from training.storage.feedback import Feedback, FeedbackItem, content_hash, split_of
from training.storage.registry import Registry
from training.storage.retrain_policies import PolicyState, RetrainPolicies, RetrainPolicy
from training.storage.s3 import ObjectStore

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _label(n: int, label: str, predicted: str | None, *, version: str = "v1", at: datetime = NOW):
    sha = content_hash(png_bytes(n % 3, seed=n))
    return FeedbackItem(
        model="m",
        sha256=sha,
        image="png",
        label=label,
        split=split_of(sha, 0.2),
        labelled_at=at + timedelta(seconds=n),
        predicted=predicted,
        version=version if predicted else None,
        prediction_id=f"p{n}-{version}" if predicted else None,
        index=0 if predicted else None,
    )


def test_new_labels_fire_once_enough_arrived() -> None:
    policy = RetrainPolicy(every_n_labels=10)
    state = PolicyState(counted_from=NOW)
    old = [_label(i, "a", "a", at=NOW - timedelta(hours=1)) for i in range(30)]  # before
    assert decide_trigger(policy, state, old, "v1", NOW) is None
    new = [_label(i, "a", None) for i in range(1, 10)]
    assert decide_trigger(policy, state, old + new, "v1", NOW) is None  # 9 < 10
    fired = decide_trigger(policy, state, [*old, *new, _label(50, "b", None)], "v1", NOW)
    assert fired is not None
    assert fired[0] == "every_n_labels"
    assert fired[1].startswith("10 labels since")


def test_the_same_label_sent_again_is_not_a_new_label() -> None:
    """A relabel keeps the time the image first got its label: every_n_labels counts new
    evidence (a new image, a changed label), not repeats of the same word."""
    policy = RetrainPolicy(every_n_labels=10)
    state = PolicyState(counted_from=NOW)
    repeats = [
        _label(i, "a", "a").model_copy(update={"label_since": NOW - timedelta(hours=1)})
        for i in range(1, 21)
    ]
    assert decide_trigger(policy, state, repeats, "v1", NOW) is None
    changed = [r.model_copy(update={"label_since": r.labelled_at}) for r in repeats[:10]]
    fired = decide_trigger(policy, state, changed + repeats[10:], "v1", NOW)
    assert fired is not None
    assert fired[1].startswith("10 labels since")


def test_accuracy_counts_the_serving_versions_last_window_only() -> None:
    policy = RetrainPolicy(accuracy_below=0.8, window_labels=20)
    state = PolicyState(counted_from=NOW)
    right = [_label(i, "a", "a") for i in range(20)]
    wrong = [_label(100 + i, "a", "b") for i in range(10)]
    assert live_accuracy(right + wrong, "v1", 20) == (0.5, 20)  # the last 20: 10 of each
    fired = decide_trigger(policy, state, right + wrong, "v1", NOW)
    assert fired is not None
    assert fired[0] == "accuracy_below"
    # the same labels judged another version's answers: the new version has none yet
    assert decide_trigger(policy, state, right + wrong, "v2", NOW) is None
    # fewer labels than the window: not enough to judge
    assert decide_trigger(policy, state, wrong, "v1", NOW) is None
    # uploads (no prediction) are training data, not measurements
    uploads = [_label(200 + i, "a", None) for i in range(40)]
    assert live_accuracy(uploads, "v1", 20) == (0.0, 0)


def test_accuracy_waits_for_new_labels_after_a_firing() -> None:
    """A retrain the gate refused leaves the same version serving: the labels that fired
    it must not fire again after the cooldown, only a window of labels given since."""
    policy = RetrainPolicy(accuracy_below=0.8, window_labels=20, cooldown_s=3600)
    wrong = [_label(i, "a", "b") for i in range(30)]
    fired_at = NOW + timedelta(minutes=1)  # after those labels
    state = PolicyState(counted_from=fired_at, last_fired_at=fired_at)
    later = fired_at + timedelta(hours=2)  # the cooldown is over
    assert decide_trigger(policy, state, wrong, "v1", later) is None
    newer = [_label(1000 + i, "a", "b", at=fired_at) for i in range(19)]
    assert decide_trigger(policy, state, wrong + newer, "v1", later) is None  # 19 < 20
    newest = _label(2000, "a", "b", at=fired_at)
    fired = decide_trigger(policy, state, [*wrong, *newer, newest], "v1", later)
    assert fired is not None
    assert fired[0] == "accuracy_below"


def test_cooldown_holds_every_trigger_back_and_the_schedule_runs_from_the_last_run() -> None:
    policy = RetrainPolicy(every_n_labels=10, every_s=7200, cooldown_s=3600)
    fired_at = NOW - timedelta(minutes=30)
    state = PolicyState(counted_from=fired_at, last_fired_at=fired_at)
    many = [_label(i, "a", None) for i in range(50)]
    assert decide_trigger(policy, state, many, "v1", NOW) is None  # inside the cooldown
    later = NOW + timedelta(minutes=31)
    assert decide_trigger(policy, state, many, "v1", later)[0] == "every_n_labels"  # type: ignore[index]
    assert decide_trigger(policy, state, [], "v1", later) is None  # schedule: 61 min < 2 h
    assert decide_trigger(policy, state, [], "v1", fired_at + timedelta(hours=2))[0] == "schedule"  # type: ignore[index]
    off = policy.model_copy(update={"enabled": False})
    assert decide_trigger(off, state, many, "v1", later) is None


def _feedback(
    store: ObjectStore,
    n: int,
    label: str,
    seed: int,
    drawn: str | None = None,
    version: str | None = None,
) -> None:
    """A label; with ``version``: of that version's answer, which was ``drawn``'s class."""
    data = png_bytes({"a": 0, "b": 1, "c": 2}[drawn or label], seed=seed)
    sha = content_hash(data)
    Feedback(store).put(
        FeedbackItem(
            model="m",
            sha256=sha,
            image="png",
            label=label,
            split=split_of(sha, 0.3),
            labelled_at=datetime.now(UTC),
            predicted=(drawn or label) if version else None,
            version=version,
            prediction_id=f"p{n}-{seed}" if version else None,
            index=0 if version else None,
        ),
        data,
    )


def test_a_firing_writes_base_plus_feedback_and_the_state(store: ObjectStore) -> None:
    base = write_imagefolder(store, "basis", classes=3, train=6, val=2, splits=False)
    reg = Registry(store)
    manifest, _ = publish_tiny_model(reg, "m")
    policies = RetrainPolicies(store)
    policies.set("m", RetrainPolicy(every_n_labels=10, base_dataset=base, epochs=2))
    ids = (f"job-{i}" for i in count())
    watch = PolicyWatch(store, alias="production")
    assert watch.due({}, lambda: next(ids)) == []  # first pass: labels count from now
    state = policies.state("m")
    assert state is not None
    assert state.fired == 0
    for i in range(12):
        _feedback(store, i, "abc"[i % 3], seed=100 + i)
    assert watch.due({"m": 1}, lambda: next(ids)) == []  # max_concurrent 1 already running
    (firing,) = watch.due({}, lambda: next(ids))
    assert firing.trigger.kind == "every_n_labels"
    assert firing.trigger.serving_version == manifest.version
    assert firing.spec["base"] == {"version": f"m@{manifest.version}"}
    assert firing.spec["epochs"] == 2
    images = firing.trigger.dataset["images"]
    assert images["base"]["train"] + images["base"]["val"] == 18  # 3 classes x 6 images
    assert images["feedback"]["train"] + images["feedback"]["val"] == 12
    # the base keeps its split; every line names its source
    index = index_dataset(store, firing.spec["dataset"])
    original = index_dataset(store, base, val_fraction=0.2, seed=0)
    assert {s.key for s in index.val if s.source == "base"} == {s.key for s in original.val}
    assert {s.source for s in index.train} == {"base", "feedback"}
    watch.fired("m", firing)
    after = policies.state("m")
    assert after is not None
    assert after.fired == 1
    assert after.last_job_id == firing.job_id
    assert watch.due({}, lambda: next(ids)) == []  # the cooldown now holds


def test_the_policys_freeze_wins_over_the_serving_versions(store: ObjectStore) -> None:
    manifest, _ = publish_tiny_model(Registry(store), "m")
    served = manifest.model_copy(update={"freeze": {"policy": "last_n_stages", "n": 2}})
    inherited = retrain_spec(RetrainPolicy(every_n_labels=10), served, "s3://b/d/", alias="p")
    assert inherited["freeze"] == {"policy": "last_n_stages", "n": 2}
    head = RetrainPolicy.model_validate({"every_n_labels": 10, "freeze": {"policy": "head_only"}})
    spec = retrain_spec(head, served, "s3://b/d/", alias="p")
    assert spec["freeze"] == {"policy": "head_only", "feature_cache": True}
    assert "gate" not in spec  # the settings' gate
    strict = RetrainPolicy(every_n_labels=10, min_accuracy=0.9)
    assert retrain_spec(strict, served, "s3://b/d/", alias="p")["gate"] == {"min_accuracy": 0.9}
    with pytest.raises(ValueError, match="freeze"):
        RetrainPolicy.model_validate({"every_n_labels": 10, "freeze": {"policy": "most"}})


def test_a_second_retrain_takes_the_first_ones_base_not_its_old_feedback(
    store: ObjectStore,
) -> None:
    from training.retrain_dataset import write_retrain_dataset

    base = write_imagefolder(store, "basis2", classes=3, train=4, val=2, splits=True)
    for i in range(6):
        _feedback(store, i, "abc"[i % 3], seed=300 + i)
    first, _ = write_retrain_dataset(store, "m", "job-a", base_uri=base, val_fraction=0.2, seed=0)
    _feedback(store, 0, "b", seed=300, drawn="a")  # relabelled since: the new label wins
    sha = content_hash(png_bytes(0, seed=300))
    second, contents = write_retrain_dataset(
        store, "m", "job-b", base_uri=first, val_fraction=0.2, seed=0
    )
    assert contents["images"]["base"] == {"train": 12, "val": 6}
    # 'a' kept one image after the relabel: left out of the feedback part, and named
    assert sum(contents["images"]["feedback"].values()) == 5
    assert contents["feedback_classes_left_out"] == ["a"]
    index = index_dataset(store, second)
    labels = {s.key: index.classes[s.label] for s in index.train + index.val}
    assert labels[f"feedback/m/images/{sha}.png"] == "b"


def test_a_base_that_cannot_be_indexed_records_why_and_cools_down(store: ObjectStore) -> None:
    publish_tiny_model(Registry(store), "m")
    policies = RetrainPolicies(store)
    gone = store.uri("datasets/nothing-here/")
    policies.set("m", RetrainPolicy(every_n_labels=10, base_dataset=gone))
    policies.set_state("m", PolicyState(counted_from=NOW - timedelta(days=1)))
    for i in range(10):
        _feedback(store, i, "abc"[i % 3], seed=500 + i)
    watch = PolicyWatch(store, alias="production")
    assert watch.due({}, lambda: "job-x") == []
    state = policies.state("m")
    assert state is not None
    assert state.last_fired_at is not None
    assert "no images" in (state.last_error or "")


def test_a_damaged_state_starts_again_with_the_cooldown(store: ObjectStore) -> None:
    publish_tiny_model(Registry(store), "m")
    policies = RetrainPolicies(store)
    policies.set("m", RetrainPolicy(every_n_labels=10))
    store.put_bytes("policies/m/state.json", b"{not json")
    assert PolicyWatch(store, alias="production").due({}, lambda: "job-y") == []
    state = policies.state("m")
    assert state is not None
    assert state.last_fired_at is not None


@pytest.mark.parametrize("kind", ["feedback", "base"])
def test_gate_requires_each_source_and_reports_forgetting(kind: str) -> None:
    from training.gate import SourceScore, class_drops, decide, with_sources

    overall = decide(0.9, min_accuracy=0.5, max_regression=0.02, incumbent_top1=0.8)
    assert overall.passed
    worse = {"base": 0.95, "feedback": 0.9}
    worse[kind] -= 0.2
    sources = {
        name: SourceScore(images=10, candidate_top1=worse[name], incumbent_top1=0.9)
        for name in ("base", "feedback")
    }
    cand = {"a": {"recall": 0.5, "support": 4}, "b": {"recall": 1.0, "support": 4}}
    inc = {"a": {"recall": 1.0, "support": 4}, "b": {"recall": 1.0, "support": 4}}
    drops = class_drops("base", cand, inc, 0.02)
    decision = with_sources(overall, sources, drops)
    assert not decision.passed
    assert not decision.sources[kind].passed
    assert [(d.label, d.candidate) for d in decision.forgetting] == [("a", 0.5)]
    assert any("forgetting: class 'a'" in r for r in decision.reasons)


def _drift(score: float, samples: int, total: int = 0) -> DriftScore:
    return DriftScore(
        total_samples=total or samples,
        version="v1",
        score=score,
        expected=0.05,
        samples=samples,
        outliers=round(score * samples),
        mean_distance=1.0,
        threshold=1.0,
        replicas=1,
        updated_at=NOW,
    )


def test_drift_fires_above_its_threshold_once_enough_images_were_measured() -> None:
    policy = RetrainPolicy(drift_above=0.3, drift_samples=100)
    state = PolicyState(counted_from=NOW)
    assert decide_trigger(policy, state, [], "v1", NOW) is None  # nothing measured yet
    assert decide_trigger(policy, state, [], "v1", NOW, _drift(0.9, 99)) is None  # too few
    assert decide_trigger(policy, state, [], "v1", NOW, _drift(0.2, 500)) is None  # below
    fired = decide_trigger(policy, state, [], "v1", NOW, _drift(0.4, 100))
    assert fired is not None
    assert fired[0] == "drift_above"
    assert "0.400 over 100 sampled images > drift_above 0.3" in fired[1]
    cooling = PolicyState(counted_from=NOW, last_fired_at=NOW - timedelta(minutes=5))
    assert decide_trigger(policy, cooling, [], "v1", NOW, _drift(0.9, 500)) is None
    assert RetrainPolicy(drift_above=0.5).drift_samples == 200  # a trigger on its own
    # fired on v1 when its replicas had measured 500 images; the retrain was refused
    refused = PolicyState(
        counted_from=NOW,
        last_fired_at=NOW - timedelta(hours=2),
        drift_version="v1",
        drift_total=500,
    )
    assert decide_trigger(policy, refused, [], "v1", NOW, _drift(0.9, 500, 599)) is None
    assert decide_trigger(policy, refused, [], "v1", NOW, _drift(0.9, 500, 600)) is not None
    assert decide_trigger(policy, refused, [], "v1", NOW, _drift(0.9, 100, 100)) is not None
    # (fewer in all than then: the replicas restarted, all they measured is new)
    assert decide_trigger(policy, refused, [], "v2", NOW, _drift(0.9, 100, 700)) is not None


class _Clock:
    """The time a policy pass judges at: now, plus how far the test moved it on."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.ahead


def _watched(
    store: ObjectStore, dataset: str, **policy: Any
) -> tuple[Any, RetrainPolicy, PolicyWatch, _Clock]:
    """Model ``m`` serving a published version, with this policy, and the runner's watch."""
    base = write_imagefolder(store, dataset, classes=3, train=6, val=2, splits=False)
    manifest, _ = publish_tiny_model(Registry(store), "m")
    rules = RetrainPolicy(base_dataset=base, **policy)
    RetrainPolicies(store).set("m", rules)
    clock = _Clock()
    return manifest, rules, PolicyWatch(store, alias="production", clock=clock), clock


def test_the_runner_fires_on_the_serving_versions_drift_windows(store: ObjectStore) -> None:
    manifest, policy, watch, clock = _watched(store, "drifted", drift_above=0.3, drift_samples=50)
    ids = (f"job-{i}" for i in count())
    assert watch.due({}, lambda: next(ids)) == []
    window = DriftWindow(
        model="m",
        version=manifest.version,
        replica="r1",
        updated_at=datetime.now(UTC),
        samples=40,
        outliers=30,
        threshold=1.0,
        expected=0.05,
        total_samples=40,
    )
    DriftScores(store).put(window)
    assert watch.due({}, lambda: next(ids)) == []  # 40 images < drift_samples 50
    DriftScores(store).put(window.model_copy(update={"replica": "r2"}))
    firings = watch.due({}, lambda: next(ids))
    assert [f.trigger.kind for f in firings] == ["drift_above"]
    assert firings[0].trigger.serving_version == manifest.version
    assert "0.750 over 80 sampled images" in firings[0].trigger.detail
    watch.fired("m", firings[0])
    # its retrain was refused: after the cooldown, windows as fresh but with no image
    # measured since fire nothing
    clock.ahead = timedelta(seconds=policy.cooldown_s + 1)
    same = {"updated_at": clock()}
    DriftScores(store).put(window.model_copy(update=same))
    DriftScores(store).put(window.model_copy(update={**same, "replica": "r2"}))
    assert watch.due({}, lambda: next(ids)) == []
    # 50 more images measured since (a window keeps its last 40): new evidence
    later = {"updated_at": clock(), "total_samples": 65}
    DriftScores(store).put(window.model_copy(update=later))
    DriftScores(store).put(window.model_copy(update={**later, "replica": "r2"}))
    again = watch.due({}, lambda: next(ids))
    assert [f.trigger.kind for f in again] == ["drift_above"]


def test_the_runner_does_not_refire_a_refused_retrain_on_the_same_labels(
    store: ObjectStore,
) -> None:
    """At runtime: accuracy_below fires; its job is refused (the version still serves);
    after the cooldown the runner does not fire on the same labels, and fires again once a
    new window of labels came."""
    manifest, policy, watch, clock = _watched(
        store, "refused", accuracy_below=0.8, window_labels=20
    )
    ids = (f"job-{i}" for i in count())
    assert watch.due({}, lambda: next(ids)) == []  # first look: state from now
    for i in range(20):
        _feedback(store, i, "a", seed=500 + i, drawn="b", version=manifest.version)
    first = watch.due({}, lambda: next(ids))
    assert [f.trigger.kind for f in first] == ["accuracy_below"]
    watch.fired("m", first[0])
    # the job was refused: the same version serves; the cooldown passes
    clock.ahead = timedelta(seconds=policy.cooldown_s + 1)
    assert watch.due({}, lambda: next(ids)) == []  # the same labels: no new evidence
    for i in range(20):
        _feedback(store, 100 + i, "a", seed=900 + i, drawn="b", version=manifest.version)
    again = watch.due({}, lambda: next(ids))
    assert [f.trigger.kind for f in again] == ["accuracy_below"]
