"""The job runner as a state machine, without Ray: real records on SeaweedFS, a fake launcher
whose runs end when the test says (issue 25: one launcher interface, a Ray-free runner)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import until
from fake_launcher import RecordingLauncher
from service.control.launchers import RunEnd
from service.control.scheduler import JobRunner
from service.settings import RefitSettings
from training.storage.job_lease import JobLease
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore

TTL = 1.0


def _spec(store: ObjectStore, model: str) -> dict[str, Any]:
    return {"model": model, "base": {"backbone": "resnet18"}, "dataset": store.uri("datasets/c/")}


@pytest.fixture
def parts(settings: RefitSettings, store: ObjectStore) -> Iterator[dict[str, Any]]:
    store.put_bytes("datasets/c/a/1.png", b"x")
    training = settings.training.model_copy(
        update={"job_lease_s": TTL, "max_running_jobs": 2, "max_failures": 2}
    )
    launcher = RecordingLauncher()
    notified: list[str] = []
    runner = JobRunner(
        settings.model_copy(update={"training": training}),
        launcher=launcher,
        notify_published=lambda _, model: notified.append(model),
    )
    try:
        yield {
            "runner": runner,
            "launcher": launcher,
            "jobs": JobStore(store),
            "store": store,
            "notified": notified,
        }
    finally:
        runner.close()


def _create(parts: dict[str, Any], model: str) -> str:
    out = parts["runner"].create(_spec(parts["store"], model), None)
    return str(out["record"]["job_id"])


def test_the_runner_imports_no_ray() -> None:
    code = "import sys, service.control.scheduler; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


def test_one_job_per_model_under_the_cap_and_the_end_is_announced(
    parts: dict[str, Any],
) -> None:
    runner, launcher, jobs = parts["runner"], parts["launcher"], parts["jobs"]
    a1, a2, b, c = (_create(parts, m) for m in ("a", "a", "b", "c"))
    assert until(lambda: launcher.started == [a1, b])
    time.sleep(0.6)  # a pass later: a2 waits for its model, c for a slot
    assert launcher.started == [a1, b]
    assert runner.stats()["queued"] == 2
    assert runner.stats()["recorded"] == 2  # the launcher's own stats are passed through
    # the run's process recorded its end; the launcher then reports the run over
    jobs.transition(a1, "succeeded", reason="published", result={"published": True})
    launcher.end(a1)
    assert until(lambda: launcher.started == [a1, b, a2])
    assert parts["notified"] == ["a"]
    jobs.transition(b, "succeeded", reason="gated", result={"published": False})
    launcher.end(b)
    assert until(lambda: launcher.started == [a1, b, a2, c])
    assert until(lambda: runner.stats()["finished"] == {"succeeded": 2})
    assert parts["notified"] == ["a"]  # nothing published by b
    assert launcher.idle_calls > 0


def test_a_run_whose_process_died_is_retried_until_attempts_run_out(
    parts: dict[str, Any],
) -> None:
    launcher, jobs = parts["launcher"], parts["jobs"]
    job = _create(parts, "a")
    for attempt in (1, 2, 3):
        assert until(lambda n=attempt: launcher.started == [job] * n), launcher.started
        assert jobs.get(job).attempts == attempt
        launcher.end(job, RunEnd("ActorDiedError: killed", process_died=True))
    record = jobs.get(job)
    assert until(lambda: jobs.get(job).terminal)
    record = jobs.get(job)
    assert record.state == "failed"
    assert record.reason == "the job's process ended unexpectedly: ActorDiedError: killed"
    assert launcher.started == [job] * 3  # max_failures=2: two retries, no fourth run


def test_a_run_that_ended_without_recording_fails_and_is_not_retried(
    parts: dict[str, Any],
) -> None:
    launcher, jobs = parts["launcher"], parts["jobs"]
    job = _create(parts, "a")
    assert until(lambda: launcher.started == [job])
    launcher.end(job, RunEnd("RayJob ended: Failed"))  # not a dead process: final
    assert until(lambda: jobs.get(job).terminal)
    record = jobs.get(job)
    assert record.state == "failed"
    assert record.error is not None
    assert record.error["code"] == "training_failed"
    time.sleep(0.6)
    assert launcher.started == [job]


def test_cancel_stops_a_running_job_and_drops_a_queued_one(parts: dict[str, Any]) -> None:
    runner, launcher, jobs = parts["runner"], parts["launcher"], parts["jobs"]
    running, queued = _create(parts, "a"), _create(parts, "a")
    assert until(lambda: launcher.started == [running])
    assert runner.cancel(queued)["state"] == "cancelled"
    assert runner.cancel(running)["cancel_requested"]
    assert launcher.stopped == [running]
    assert until(lambda: jobs.get(running).state == "cancelled")
    assert "checkpoints kept" in (jobs.get(running).reason or "")
    assert launcher.started == [running]
    assert until(lambda: runner.stats()["finished"] == {"cancelled": 2})


def test_a_refused_lease_gives_the_claim_back_and_the_job_is_watched(
    parts: dict[str, Any],
) -> None:
    runner, launcher, jobs = parts["runner"], parts["launcher"], parts["jobs"]
    with runner._lock:  # no scheduling pass between the create and the other owner's take
        job = _create(parts, "a")
        other = JobLease(jobs, job, "local:cli", TTL)
        other.acquire()
    with other.heartbeat():
        assert until(lambda: launcher.unclaimed == [job])
        assert runner.stats()["watching"] == [job]
        assert launcher.started == []
        other.finish("succeeded", reason="published", result={"published": True})
    assert until(lambda: runner.stats()["finished"] == {"succeeded": 1})
    assert parts["notified"] == ["a"]  # a watched job's version is announced too


def test_a_lost_lease_stops_the_run(parts: dict[str, Any]) -> None:
    runner, launcher, jobs = parts["runner"], parts["launcher"], parts["jobs"]
    job = _create(parts, "a")
    assert until(lambda: launcher.started == [job])
    # another owner took the job (its lease live): the runner's next renewal finds it
    far = time.time() + 600
    jobs.update(job, lambda r: r.model_copy(update={"owner": "local:cli", "lease_expires_at": far}))
    assert until(lambda: launcher.stopped == [job], TTL * 4)
    assert runner.stats()["running"] == 0
    assert runner.stats()["watching"] == [job]  # its model stays busy meanwhile
    assert jobs.get(job).owner == "local:cli"  # the record is the new owner's to end


def test_a_label_brings_the_policy_pass_forward_and_a_burst_costs_few(
    settings: RefitSettings, store: ObjectStore
) -> None:
    training = settings.training.model_copy(update={"policy_check_s": 600.0})
    runner = JobRunner(
        settings.model_copy(update={"training": training}),
        launcher=RecordingLauncher(),
        notify_published=lambda *_: None,
    )
    passes: list[float] = []
    due = runner.policy_watch.due

    def counted(*args: Any) -> Any:
        passes.append(time.monotonic())
        return due(*args)

    runner.policy_watch.due = counted  # type: ignore[method-assign]
    try:
        assert until(lambda: len(passes) == 1)  # the first pass, at start
        time.sleep(1.0)
        assert len(passes) == 1  # the next one is ten minutes away
        sent = time.monotonic()
        runner.labels_arrived("a")
        assert until(lambda: len(passes) == 2, 2.0)
        assert passes[1] - sent < 1.0
        for _ in range(40):  # a burst of labels over about a second
            runner.labels_arrived("a")
            time.sleep(0.025)
        time.sleep(1.0)
        assert 3 <= len(passes) <= 8, len(passes)  # a pass per quarter second at most
        assert all(b - a >= 0.2 for a, b in itertools.pairwise(passes))
    finally:
        runner.close()
