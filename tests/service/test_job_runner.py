"""The job runner actor on a real local Ray: per-model serialization under a global cap,
cancel of a queued job, a runner restart that requeues and finishes its running job, a
runner that leaves a job another owner runs alone, and the job process it keeps warm."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import ray

from conftest import write_imagefolder
from service.control.notices import NAMESPACE
from service.control.runner_clients import runner_actor, stop_actors
from service.settings import RefitSettings
from training.finetune import run_finetune
from training.job_settings import TrainingSettings
from training.local_fit import stored_checkpoints
from training.spec import parse_spec
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.trains, pytest.mark.usefixtures("ray_session")]
SMALL = {"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def _spec(store: ObjectStore, model: str, **over: Any) -> dict[str, Any]:
    return {
        "model": model,
        "base": {"backbone": "resnet18"},
        "dataset": store.uri("datasets/tiny/"),
        "epochs": 1,
        "batch_size": 8,
        "workers": 1,
        "preprocess": SMALL,
        "augment": {"hflip": False},
        **over,
    }


def _cpus_return_to(baseline: float, timeout: float = 30) -> None:
    """Every CPU a job took is free again: no process, controller or worker leaked."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < baseline:
        assert time.monotonic() < deadline, (
            f"{ray.available_resources().get('CPU', 0)} CPUs free, {baseline} before the jobs"
        )
        time.sleep(0.5)


def _wait(jobs: JobStore, job_id: str, states: set[str], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = jobs.get(job_id)
        if record.state in states:
            return record
        time.sleep(0.2)
    raise AssertionError(f"{job_id} stayed {record.state}")


@pytest.fixture
def runner_settings(settings: RefitSettings) -> Any:
    s = settings.model_copy(
        update={
            "training": TrainingSettings(
                max_running_jobs=2, progress_interval_s=0.5, checkpoint_interval_s=0
            )
        }
    )
    yield s
    stop_actors(s)


def test_one_job_per_model_under_a_global_cap(runner_settings: RefitSettings) -> None:
    store = ObjectStore(runner_settings.s3)
    write_imagefolder(store, "tiny", classes=2, train=8, val=4)
    jobs = JobStore(store)
    baseline = ray.available_resources().get("CPU", 0)
    runner = runner_actor(runner_settings)
    x = ray.get(runner.create.remote(_spec(store, "m1"), None))["record"]["job_id"]
    y = ray.get(runner.create.remote(_spec(store, "m1"), None))["record"]["job_id"]
    z = ray.get(runner.create.remote(_spec(store, "m2"), None))["record"]["job_id"]
    _wait(jobs, x, {"running"})
    _wait(jobs, z, {"running"})  # another model runs beside x (cap 2)
    assert jobs.get(y).state == "queued"  # same model as x: waits
    stats = ray.get(runner.stats.remote())
    assert stats["running"] == 2
    assert stats["queued"] == 1
    cancelled = ray.get(runner.cancel.remote(y))
    assert cancelled["state"] == "cancelled"
    assert "before it started" in cancelled["reason"]
    assert _wait(jobs, x, {"succeeded", "failed"}).state == "succeeded"
    assert _wait(jobs, z, {"succeeded", "failed"}).state == "succeeded"
    assert jobs.get(y).started_at is None
    # the record ends before the runner reaps the task (process kill, placement group freed:
    # seconds on two loaded cores)
    deadline = time.monotonic() + 60
    while ray.get(runner.stats.remote())["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.get(runner.stats.remote())["finished"] == {"cancelled": 1, "succeeded": 2}
    _cpus_return_to(baseline)


def test_restarted_runner_requeues_and_finishes(runner_settings: RefitSettings) -> None:
    store = ObjectStore(runner_settings.s3)
    write_imagefolder(store, "tiny", classes=2, train=24, val=4)
    jobs = JobStore(store)
    baseline = ray.available_resources().get("CPU", 0)
    runner = runner_actor(runner_settings)
    spec = _spec(store, "m3", epochs=3)
    job = ray.get(runner.create.remote(spec, None))["record"]["job_id"]
    _first_checkpoint(store, job)
    ray.kill(runner, no_restart=False)  # the runner dies; its job's process dies with it
    record = _wait(jobs, job, {"succeeded", "failed"}, timeout=400)
    assert record.state == "succeeded", record
    assert record.attempts == 2
    assert record.result is not None
    assert record.result["resumed_from_epoch"] >= 1  # resumed from the stored checkpoint
    _cpus_return_to(baseline)  # the first attempt's training died with the old runner


def _first_checkpoint(store: ObjectStore, job: str, timeout: float = 300) -> None:
    """Until the job's first checkpoint is complete on the store (uploads run while the next
    epoch trains: an epoch's progress record comes before its checkpoint is stored)."""
    deadline = time.monotonic() + timeout
    while not stored_checkpoints(store, job):
        assert time.monotonic() < deadline, "no checkpoint stored"
        time.sleep(0.2)


def test_a_job_whose_process_dies_is_retried_and_resumes(
    runner_settings: RefitSettings,
) -> None:
    """The warm process that runs a one-worker job in-process is killed mid-run: the runner
    requeues the job (a new process), which resumes from its checkpoint and ends; the next
    warm process is started."""
    store = ObjectStore(runner_settings.s3)
    write_imagefolder(store, "tiny", classes=2, train=24, val=4)
    jobs = JobStore(store)
    baseline = ray.available_resources().get("CPU", 0)
    runner = runner_actor(runner_settings)
    spare = _warm(runner)
    job = ray.get(runner.create.remote(_spec(store, "m6", epochs=3), None))["record"]["job_id"]
    _first_checkpoint(store, job)
    ray.kill(ray.get_actor(spare, namespace=NAMESPACE))  # the process that runs the job
    record = _wait(jobs, job, {"succeeded", "failed"}, timeout=400)
    assert record.state == "succeeded", record
    assert record.attempts == 2
    assert record.result is not None
    assert record.result["resumed_from_epoch"] >= 1
    deadline = time.monotonic() + 30  # counted at the runner's next pass
    while ray.get(runner.stats.remote())["finished"] != {"succeeded": 1}:
        assert time.monotonic() < deadline, ray.get(runner.stats.remote())
        time.sleep(0.2)
    _warm(runner, other_than=spare)
    _cpus_return_to(baseline)


def test_runner_started_beside_a_local_run_leaves_it_alone(
    runner_settings: RefitSettings,
) -> None:
    """``refit up``'s demo runs its base job from the CLI while the API may start the runner:
    the runner must watch that job, not take it for an orphan and train it a second time."""
    store = ObjectStore(runner_settings.s3)
    write_imagefolder(store, "tiny", classes=2, train=16, val=4)
    jobs = JobStore(store)
    spec = parse_spec(_spec(store, "m4", epochs=2), runner_settings.training)
    record, _ = jobs.create(spec)
    outcome: dict[str, Any] = {}

    def local_run() -> None:
        try:
            outcome["result"] = run_finetune(
                spec, s3=runner_settings.s3, training=runner_settings.training, job_id=record.job_id
            )
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=local_run)
    thread.start()
    _wait(jobs, record.job_id, {"running"})
    runner = runner_actor(runner_settings)
    seen = []
    while thread.is_alive():
        seen.append(ray.get(runner.stats.remote()))
        time.sleep(0.3)
    thread.join()
    assert "error" not in outcome, outcome
    assert seen
    assert seen[0]["watching"] == [record.job_id]
    assert all(s["running"] == 0 for s in seen)  # the runner never launched it
    final = jobs.get(record.job_id)
    assert (final.state, final.attempts) == ("succeeded", 1)
    assert final.owner is not None
    assert final.owner.startswith("local:")
    deadline = time.monotonic() + 10
    while ray.get(runner.stats.remote())["finished"] != {"succeeded": 1}:
        assert time.monotonic() < deadline, ray.get(runner.stats.remote())
        time.sleep(0.2)


def _warm(runner: Any, other_than: str | None = None, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not (names := ray.get(runner.stats.remote())["warm_processes"]) or other_than in names:
        assert time.monotonic() < deadline, "no warm job process"
        time.sleep(0.2)
    return str(names[0])


def _dead(name: str, timeout: float = 60) -> bool:
    """Whether the named process is gone (waits for a kill to land)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(ray.get_actor(name, namespace=NAMESPACE).ready.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayActorError):
            return True
        time.sleep(0.2)
    return False


def test_the_next_jobs_process_waits_warm(runner_settings: RefitSettings) -> None:
    """While no job runs the runner keeps one job process started (replaced if it dies);
    the next job runs in it, and another starts once that job ended."""
    store = ObjectStore(runner_settings.s3)
    write_imagefolder(store, "tiny", classes=2, train=8, val=4)
    jobs = JobStore(store)
    runner = runner_actor(runner_settings)
    first = _warm(runner)
    ray.kill(ray.get_actor(first, namespace=NAMESPACE))
    assert _dead(first)
    spare = _warm(runner, other_than=first)  # the dead one was replaced
    job = ray.get(runner.create.remote(_spec(store, "m5"), None))["record"]["job_id"]
    running = _wait(jobs, job, {"running"})
    # its owner names the process, so a successor runner can end it (a leftover) by name
    assert running.owner
    assert spare.endswith(running.owner.rsplit(":", 1)[1])
    assert ray.get(runner.stats.remote())["warm_processes"] == []  # taken; none while it runs
    assert _wait(jobs, job, {"succeeded", "failed"}).state == "succeeded"
    after = _warm(runner, other_than=spare)
    assert _dead(spare)  # the job ran in it: the runner ended it with the job
    assert not _dead(after, timeout=1)


def test_warm_process_count_is_a_setting(settings: RefitSettings) -> None:
    """None kept when turned off; two when asked for two (a burst of jobs starts warm)."""
    off = settings.model_copy(update={"training": TrainingSettings(warm_job_processes=0)})
    try:
        runner = runner_actor(off)
        time.sleep(2)  # four scheduler passes
        assert ray.get(runner.stats.remote())["warm_processes"] == []
    finally:
        stop_actors(off)
    two = settings.model_copy(update={"training": TrainingSettings(warm_job_processes=2)})
    try:
        runner = runner_actor(two)
        deadline = time.monotonic() + 60
        while len(names := ray.get(runner.stats.remote())["warm_processes"]) < 2:
            assert time.monotonic() < deadline, names
            time.sleep(0.2)
        assert len(set(names)) == 2
        for name in names:
            assert ray.get(ray.get_actor(name, namespace=NAMESPACE).ready.remote(), timeout=60)
    finally:
        stop_actors(two)
