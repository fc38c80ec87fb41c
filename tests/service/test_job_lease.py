"""One job, one owner: the lease protocol on real records (SeaweedFS), and a job runner that
watches a job another owner runs instead of running it again (issue 10, class 11)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import until
from fake_launcher import RecordingLauncher
from service.control.scheduler import JobRunner
from service.settings import RefitSettings
from training.spec import parse_spec
from training.storage.errors import ConflictError
from training.storage.job_lease import JobCancelledError, JobLease, LeaseLostError
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore

TTL = 1.0


def _spec(store: ObjectStore) -> Any:
    return parse_spec(
        {"model": "cats", "base": {"backbone": "resnet18"}, "dataset": store.uri("datasets/c/")}
    )


@pytest.fixture
def lease_settings(settings: RefitSettings) -> RefitSettings:
    training = settings.training.model_copy(update={"job_lease_s": TTL})
    return settings.model_copy(update={"training": training})


def test_one_owner_at_a_time(store: ObjectStore) -> None:
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    first = JobLease(jobs, record.job_id, "local:a", TTL)
    running = first.acquire()
    assert (running.state, running.owner, running.attempts) == ("running", "local:a", 1)
    assert first.acquire().attempts == 1  # the owner itself: a renewal, not a new attempt

    second = JobLease(jobs, record.job_id, "local:b", TTL)
    with pytest.raises(ConflictError) as refused:
        second.acquire()
    assert refused.value.field == "job_id"
    assert first.renew()

    time.sleep(TTL + 0.1)  # the first owner stopped renewing
    assert second.acquire().attempts == 2
    assert not first.renew()
    assert first.lost is not None
    with pytest.raises(LeaseLostError):
        first.check()
    assert first.finish("succeeded") is None  # the old owner records nothing
    assert not jobs.get(record.job_id).terminal

    second.check()
    ended = second.finish("succeeded", reason="done")
    assert ended is not None
    assert ended.state == "succeeded"
    assert ended.lease_expires_at is None
    with pytest.raises(ConflictError):
        JobLease(jobs, record.job_id, "local:c", TTL).acquire()  # ended is final


def test_lease_runs_out_unrenewed_and_cancel_is_seen(store: ObjectStore) -> None:
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    lease = JobLease(jobs, record.job_id, "local:a", TTL)
    lease.acquire()
    with lease.heartbeat():
        time.sleep(TTL * 2)
        lease.check()  # renewed meanwhile
        jobs.update(record.job_id, lambda r: r.model_copy(update={"cancel_requested": True}))
        assert until(lambda: lease.cancel_requested, TTL * 2)
        with pytest.raises(JobCancelledError):
            lease.check()
    other = JobLease(jobs, jobs.create(_spec(store))[0].job_id, "local:a", TTL)
    other.acquire()
    time.sleep(TTL + 0.05)  # no heartbeat: the owner itself must assume it lost the job
    with pytest.raises(LeaseLostError):
        other.check()


def test_runner_watches_a_live_owner_and_takes_over_only_after_expiry(
    lease_settings: RefitSettings, store: ObjectStore
) -> None:
    store.put_bytes("datasets/c/a/1.png", b"x")
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    local = JobLease(jobs, record.job_id, "local:cli", TTL)
    local.acquire()
    launcher = RecordingLauncher()
    with local.heartbeat():
        runner = JobRunner(lease_settings, launcher=launcher, notify_published=lambda *_: None)
        try:
            assert runner.stats()["watching"] == [record.job_id]
            queued = runner.create(_spec(store).model_dump(mode="json"), None)["record"]
            time.sleep(TTL * 3)  # several lease lengths: the live owner keeps it
            assert launcher.started == []  # neither the watched job nor its model's next
            assert jobs.get(record.job_id).attempts == 1
        except BaseException:
            runner.close()
            raise
    try:
        # the owner stopped renewing: the runner takes the job over once, then the next job
        # of the model waits for it
        assert until(lambda: launcher.started == [record.job_id], TTL * 6)
        taken = jobs.get(record.job_id)
        assert (taken.state, taken.attempts) == ("running", 2)
        assert taken.owner == launcher.claim(record.job_id)
        assert "stopped renewing" not in (taken.reason or "")  # the start cleared it
        with pytest.raises(LeaseLostError):
            local.check()
        time.sleep(0.5)
        assert launcher.started == [record.job_id]
        assert jobs.get(queued["job_id"]).state == "queued"
    finally:
        runner.close()


def test_runner_counts_a_watched_job_that_ends(
    lease_settings: RefitSettings, store: ObjectStore
) -> None:
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    local = JobLease(jobs, record.job_id, "local:cli", TTL)
    local.acquire()
    runner = JobRunner(lease_settings, launcher=RecordingLauncher(), notify_published=print)
    try:
        with local.heartbeat():
            assert runner.stats()["watching"] == [record.job_id]
            local.finish("succeeded", reason="published v1", result={"published": False})
        assert until(lambda: runner.stats()["finished"] == {"succeeded": 1})
        assert runner.stats()["watching"] == []
    finally:
        runner.close()


def test_restarted_runner_takes_its_own_jobs_back_at_once(
    lease_settings: RefitSettings, store: ObjectStore
) -> None:
    store.put_bytes("datasets/c/a/1.png", b"x")
    settings = lease_settings.model_copy(
        update={"training": lease_settings.training.model_copy(update={"job_lease_s": 600.0})}
    )
    first_launcher = RecordingLauncher()
    first = JobRunner(settings, launcher=first_launcher, notify_published=lambda *_: None)
    job_id = first.create(_spec(store).model_dump(mode="json"), None)["record"]["job_id"]
    assert until(lambda: first_launcher.started == [job_id])
    first.close()  # "dies" with its lease live for ten minutes

    second_launcher = RecordingLauncher()
    second = JobRunner(settings, launcher=second_launcher, notify_published=lambda *_: None)
    try:
        assert until(lambda: second_launcher.started == [job_id], 5.0)
        assert JobStore(store).get(job_id).attempts == 2
    finally:
        second.close()


def test_cancel_of_a_job_another_owner_runs_goes_through_its_owner(
    lease_settings: RefitSettings, store: ObjectStore
) -> None:
    jobs = JobStore(store)
    runner = JobRunner(lease_settings, launcher=RecordingLauncher(), notify_published=print)
    try:
        # a local run that began after the runner started: the runner has not met it
        record, _ = jobs.create(_spec(store))
        local = JobLease(jobs, record.job_id, "local:cli", TTL)
        local.acquire()
        with local.heartbeat():
            flagged = runner.cancel(record.job_id)
            assert (flagged["state"], flagged["cancel_requested"]) == ("running", True)
            assert until(lambda: local.cancel_requested, TTL * 2)
            with pytest.raises(JobCancelledError):
                local.check()
            local.finish("cancelled", reason="cancelled on request")
        assert until(lambda: runner.stats()["finished"] == {"cancelled": 1})
        assert jobs.get(record.job_id).state == "cancelled"
    finally:
        runner.close()
