"""The job runner: queues fine-tune jobs and runs each through its launcher, outside any
request handler (on a cluster, inside a detached actor: ``runner_clients``).

* At most ``max_running_jobs`` run at once, and at most one per model; the others wait in a
  FIFO queue of ``max_queued_jobs`` (a create beyond that is TooManyJobsError, 429).
* Where a job runs is its launcher's business (``launchers``: a job process on this Ray
  cluster, or a KubeRay RayJob); the runner holds the queue, the leases and the records, and
  asks the launcher to claim, start, poll and stop runs. It imports no Ray: its tests drive it
  with a fake launcher.
* Retrain policies are evaluated on the same thread every ``policy_check_s``
  (``retrain_triggers``): a policy that fires queues its job like any other, with the trigger
  in the record.
* Records live on the store, so an API restart loses nothing; a restarted runner requeues the
  jobs its predecessor was running (a run resumes from its last checkpoint), and retries a
  job whose process died under it up to ``max_failures`` times.
* A job is run by one owner at a time (``training.storage.job_lease``): the runner takes each
  job's lease when it starts it and renews it while it runs. A running job another owner
  holds (``refit finetune --local``, a runner of another cluster) is watched, not rerun: its
  model counts as busy, and the runner takes it over only once that owner's lease ran out.

Over 300 lines because queueing, starting, watching and reaping are one state machine under
one lock.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from service.control.launchers import Launcher, RunEnd
from service.control.retrain_triggers import Firing, PolicyWatch
from service.settings import RefitSettings
from training.spec import FinetuneSpec, parse_spec
from training.storage.errors import ConflictError, DataError, RefitError, TooManyJobsError
from training.storage.ids import new_job_id
from training.storage.job_lease import JobLease, lease_live
from training.storage.jobs import JobRecord, JobState, JobStore
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

LABEL_PASS_GAP_S = 0.25
"""The least time between two policy passes that labels asked for."""


class JobRunner:
    """The queue and the running jobs of one store location (a threaded actor)."""

    def __init__(
        self,
        settings: RefitSettings,
        launcher: Launcher | None = None,
        notify_published: Callable[[RefitSettings, str], None] | None = None,
    ) -> None:
        """``launcher``: where jobs run (None: the one the settings name);
        ``notify_published``: how replicas hear of a version a job published (None: the
        registry notices on this Ray cluster)."""
        self.settings = settings
        if notify_published is None:
            from service.control.notices import notify

            notify_published = notify
        self.notify_published = notify_published
        self.jobs = JobStore(ObjectStore(settings.s3))
        self.queue: list[str] = []
        self.model_of: dict[str, str] = {}
        self.running: set[str] = set()  # jobs this runner started that have not ended
        self.leases: dict[str, JobLease] = {}  # job id -> this runner's lease on it
        self.watching: dict[str, float] = {}  # job id run by another owner -> next look
        self.launcher = launcher if launcher is not None else make_launcher(settings)
        self.policy_watch = PolicyWatch(self.jobs.store, alias=settings.serve.alias)
        self.triggered: set[str] = set()  # queued or running jobs a retrain policy started
        self._next_policy_pass = 0.0
        self._last_policy_pass = 0.0
        self._labels_waiting = False
        self.finished: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        for record in self.jobs.unfinished():
            self.model_of[record.job_id] = record.model
            if record.trigger is not None:
                self.triggered.add(record.job_id)
            if record.state == "running" and not self._take_over(record):
                self.watching[record.job_id] = 0.0
                continue
            self.queue.append(record.job_id)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-scheduler")
        self._thread.start()

    # --- API -----------------------------------------------------------------------------------
    def create(self, spec_json: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        """Queue a job (or return the job of a known Idempotency-Key): the record, and
        whether it was created."""
        return self._queue(parse_spec(spec_json, self.settings.training), idempotency_key)

    def _queue(
        self, spec: FinetuneSpec, idempotency_key: str | None, firing: Firing | None = None
    ) -> dict[str, Any]:
        self._check_locations(spec)
        with self._lock:
            if idempotency_key is not None:
                known = self.jobs.find_idempotent(spec, idempotency_key)
                if known is not None:
                    return {"record": known.model_dump(), "created": False}
            limit = self.settings.training.max_queued_jobs
            if len(self.queue) >= limit:
                raise TooManyJobsError(
                    f"{len(self.queue)} jobs are waiting (REFIT_TRAINING__MAX_QUEUED_JOBS="
                    f"{limit}); retry later"
                )
            record, created = self.jobs.create(
                spec,
                idempotency_key=idempotency_key,
                job_id=firing.job_id if firing else None,
                trigger=firing.trigger if firing else None,
            )
            if created:
                self.queue.append(record.job_id)
                self.model_of[record.job_id] = record.model
                if firing is not None:
                    self.triggered.add(record.job_id)
        self._wake.set()
        return {"record": record.model_dump(), "created": created}

    def labels_arrived(self, model: str) -> None:
        """A label was stored: the next scheduling pass evaluates the policies (at most one
        pass every ``LABEL_PASS_GAP_S``: a burst of labels costs a few passes, not one each),
        so a label that fires a policy queues its job in a fraction of ``policy_check_s``."""
        self._labels_waiting = True
        self._wake.set()

    def _policies(self) -> None:
        """Evaluate the retrain policies (every ``policy_check_s``, or soon after a label)
        and queue what fired. Store reads happen outside the lock: the API's calls never
        wait on them."""
        now = time.monotonic()
        soon = self._labels_waiting and now >= self._last_policy_pass + LABEL_PASS_GAP_S
        if now < self._next_policy_pass and not soon:
            return
        self._labels_waiting = False
        self._last_policy_pass = now
        self._next_policy_pass = now + self.settings.training.policy_check_s
        with self._lock:
            if len(self.queue) >= self.settings.training.max_queued_jobs:
                return  # a firing now would write its dataset only to be refused
            live = {*self.queue, *self.running, *self.watching}
            self.triggered &= live
            active = collections.Counter(self.model_of[j] for j in self.triggered)
        for firing in self.policy_watch.due(dict(active), new_job_id):
            model = firing.spec["model"]
            try:
                self._queue(parse_spec(firing.spec, self.settings.training), None, firing)
            except RefitError as exc:  # filled meanwhile: it fires again at a later pass
                log.warning("retrain of %s not queued: %s", model, exc)
                continue
            self.policy_watch.fired(model, firing)

    def _check_locations(self, spec: FinetuneSpec) -> None:
        # Refuse now what the job would fail on later: URIs outside the bucket and prefix,
        # and a dataset with nothing in it.
        store = self.jobs.store
        key = store.key_from_uri(spec.dataset, field="dataset")
        if next(iter(store.list(key)), None) is None:
            raise DataError(f"no objects under {spec.dataset}", field="dataset")
        weights = spec.base.weights
        if weights is not None and weights.startswith("s3://"):
            store.key_from_uri(weights, field="base.weights")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job at once, or stop a running one (its checkpoints stay)."""
        with self._lock:
            record = self.jobs.get(job_id)
            if record.terminal:
                raise ConflictError(f"job {job_id} already {record.state}", field="job_id")
            if job_id in self.watching or (
                record.state == "running" and job_id not in self.running
            ):
                # another owner runs it (a local run the runner may not have met yet): the
                # owner sees the flag at its next check and ends it as cancelled
                self.watching.setdefault(job_id, 0.0)
                self.model_of[job_id] = record.model
                return self.jobs.update(
                    job_id, lambda r: None if r.terminal else _flag_cancel(r)
                ).model_dump()
            if job_id in self.running:
                record = self.jobs.update(job_id, lambda r: None if r.terminal else _flag_cancel(r))
                self.launcher.stop(job_id)  # the next pass reaps it
            else:
                if job_id in self.queue:
                    self.queue.remove(job_id)
                record = self.jobs.transition(
                    job_id, "cancelled", reason="cancelled on request before it started"
                )
                self.finished["cancelled"] += 1
        self._wake.set()
        return record.model_dump()

    def stats(self) -> dict[str, Any]:
        """Queued and running jobs now, and jobs finished (by state) since the runner started."""
        with self._lock:
            return {
                "queued": len(self.queue),
                "running": len(self.running),
                "running_jobs": sorted(self.running),
                "watching": sorted(self.watching),
                "finished": dict(self.finished),
                **self.launcher.stats(),
            }

    # --- scheduling -----------------------------------------------------------------------------
    def _take_over(self, record: JobRecord) -> bool:
        """Requeue a running job whose owner is gone (True), or leave it to a live owner
        (False). A lease of this launcher's runs whose driver is gone (a predecessor
        runner's, this runner's own RayJob) is void at once; another owner's only when it
        ran out."""
        owner = record.owner
        void = owner is None or self.launcher.owns(record.job_id, owner)
        if not void and lease_live(record):
            return False
        self.launcher.clear(record.job_id, owner)

        def requeue(r: JobRecord) -> JobRecord | None:
            if r.state != "running" or r.owner != owner or (not void and lease_live(r)):
                return None
            why = "the job runner restarted" if void else f"its owner {owner} stopped renewing"
            return _requeued(r, why)

        current = self.jobs.update(record.job_id, requeue)
        if current.state == "queued":
            log.info("took over %s from %s", record.job_id, owner)
            return True
        return False

    def close(self) -> None:
        """Stop scheduling (tests; an actor simply dies)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            self.launcher.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # labels waiting: look again once the gap between label passes is over
            self._wake.wait(LABEL_PASS_GAP_S if self._labels_waiting else 0.5)
            self._wake.clear()
            try:
                with self._lock:
                    self._reap()
                    self._renew()
                    self._watch()
                    self._start_ready()
                    self.launcher.idle(len(self.running))
                self._policies()
            except Exception:  # the scheduler must outlive a flaky store
                log.exception("job scheduler pass failed")

    def _reap(self) -> None:
        for job_id in sorted(self.running):
            end = self.launcher.poll(job_id)
            if end is None:
                continue
            self.running.discard(job_id)
            record = self.jobs.get(job_id)
            if self._retry(record, end):
                self.leases.pop(job_id, None)
                self.queue.insert(0, job_id)  # it was first: before jobs queued behind it
                continue
            if not record.terminal:
                record = self._close(record, end)
            self.leases.pop(job_id, None)
            if not record.terminal:  # another owner took it over: watch it end
                self.watching[job_id] = 0.0
                continue
            self.finished[record.state] += 1
            if record.result and record.result.get("published"):
                # whichever launcher ran it: replicas load the new version now, not at a poll
                self.notify_published(self.settings, record.model)

    def _retry(self, record: JobRecord, end: RunEnd) -> bool:
        """Requeue a job whose process died under it (killed, out of memory) while it has
        attempts left (``max_failures``): the retry resumes from its last checkpoint, or
        starts again when it had none. Ray Train retries its own workers; this covers the
        in-process path and the process that drives Ray Train."""
        if (
            not end.process_died
            or record.terminal
            or record.cancel_requested
            or record.attempts > self.settings.training.max_failures
        ):
            return False
        lease = self.leases.get(record.job_id)
        owner = lease.owner if lease is not None else record.owner
        why = ((end.error or "").strip().splitlines() or ["no reason given"])[0][:200]

        def requeue(r: JobRecord) -> JobRecord | None:
            if r.state != "running" or r.owner != owner or r.cancel_requested:
                return None
            return _requeued(r, f"its process died (attempt {r.attempts}): {why}")

        requeued = self.jobs.update(record.job_id, requeue).state == "queued"
        if requeued:
            log.warning("requeued %s: its process died: %s", record.job_id, why)
        return requeued

    def _close(self, record: JobRecord, end: RunEnd) -> JobRecord:
        lease = self.leases.get(record.job_id)
        state: JobState = "cancelled" if record.cancel_requested else "failed"
        if record.cancel_requested:
            fields: dict[str, Any] = {
                "reason": f"cancelled on request; checkpoints kept under runs/{record.job_id}"
            }
        else:
            message = f"the job's process ended unexpectedly: {end.error or 'no reason given'}"
            fields = {"reason": message, "error": {"code": "training_failed", "message": message}}
        if lease is not None:  # a no-op when it ended meanwhile or another owner has it
            lease.finish(state, **fields)
        return self.jobs.get(record.job_id)

    def _renew(self) -> None:
        for job_id in list(self.running):
            lease = self.leases.get(job_id)
            if lease is None or not lease.due() or lease.renew() or lease.lost is None:
                continue
            # someone took the job over: this run must stop (the owner records the end)
            log.warning("stopping %s: %s", job_id, lease.lost)
            self.running.discard(job_id)
            self.leases.pop(job_id, None)
            self.launcher.stop(job_id)
            self.launcher.forget(job_id)
            self.watching[job_id] = 0.0  # its model stays busy while the new owner runs it

    def _watch(self) -> None:
        now = time.monotonic()
        for job_id, due in list(self.watching.items()):
            if now < due:
                continue
            record = self.jobs.get(job_id)
            if record.terminal:
                del self.watching[job_id]
                self.finished[record.state] += 1
                if record.result and record.result.get("published"):
                    self.notify_published(self.settings, record.model)
            elif record.state != "running" or self._take_over(record):
                del self.watching[job_id]
                if job_id not in self.queue and self.jobs.get(job_id).state == "queued":
                    self.queue.insert(0, job_id)  # it was first: before jobs queued behind it
            else:
                # a record read every 2 s at most: its end is counted (and a published
                # version announced) promptly, an expired lease noticed within a quarter
                self.watching[job_id] = now + min(2.0, self.settings.training.job_lease_s / 4)

    def _start_ready(self) -> None:
        busy = {self.model_of[j] for j in (*self.running, *self.watching)}
        for job_id in list(self.queue):
            if len(self.running) >= self.settings.training.max_running_jobs:
                return
            model = self.model_of[job_id]
            if model in busy:
                continue
            self.queue.remove(job_id)
            owner = self.launcher.claim(job_id)
            lease = JobLease(self.jobs, job_id, owner, self.settings.training.job_lease_s)
            try:
                record = lease.acquire()
            except ConflictError as exc:  # cancelled meanwhile, or another owner runs it
                self.launcher.unclaim(job_id)
                log.info("not starting %s: %s", job_id, exc)
                if not self.jobs.get(job_id).terminal:
                    self.watching[job_id] = 0.0
                    busy.add(model)
                continue
            self.leases[job_id] = lease
            self.launcher.start(job_id, record.spec, owner)
            self.running.add(job_id)
            busy.add(model)
            log.info("started %s (%s)", job_id, model)


def _requeued(record: JobRecord, why: str) -> JobRecord:
    """The record back in the queue, owned by nobody (a retry resumes its checkpoints)."""
    return record.model_copy(
        update={
            "state": "queued",
            "reason": f"requeued: {why}",
            "owner": None,
            "lease_expires_at": None,
        }
    )


def _flag_cancel(r: JobRecord) -> JobRecord:
    return r.model_copy(update={"cancel_requested": True, "reason": "cancelling"})


__all__ = ["JobRunner"]


def make_launcher(settings: RefitSettings) -> Launcher:
    """The launcher the settings name (``REFIT_TRAINING__LAUNCHER``), imported here only when
    chosen (the runner itself stays Ray-free)."""
    if settings.training.launcher == "rayjob":
        from service.control.rayjob import RayJobLauncher

        return RayJobLauncher(settings)
    from service.control.in_cluster import InClusterLauncher

    return InClusterLauncher(settings)
