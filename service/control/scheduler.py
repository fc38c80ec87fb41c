"""The job runner: a detached Ray actor that queues fine-tune jobs and runs each as a Ray
task, outside any request handler.

* At most ``max_running_jobs`` run at once, and at most one per model; the others wait in a
  FIFO queue of ``max_queued_jobs`` (a create beyond that is TooManyJobsError, 429).
* Each job runs :func:`training.finetune.run_finetune` in its own actor process, which moves the
  record to running and then to its end. The runner owns that process, the process the Ray
  Train controller, the controller its workers: killing the process (cancel) or losing the
  runner takes everything below down; the workers' placement group, which Ray Train frees
  only through the dashboard's State API, the runner frees itself. The checkpoints already on
  the store stay under ``runs/{job_id}``. While no job runs, the runner starts the next job's
  process ahead (``warm_job_process``): Python and the training imports are ready when a
  job comes.
* Retrain policies are evaluated on the same thread every ``policy_check_s``
  (``retrain_triggers``): a policy that fires queues its job like any other, with the trigger
  in the record.
* Records live on the store, so an API restart loses nothing; a restarted runner requeues the
  jobs its predecessor was running (Ray Train resumes a run of the same name from its last
  checkpoint).
* A job is run by one owner at a time (``training.storage.job_lease``): the runner takes each
  job's lease when it starts it and renews it while it runs. A running job another owner
  holds (``refit finetune --local``, a runner of another cluster) is watched, not rerun: its
  model counts as busy, and the runner takes it over only once that owner's lease ran out.

Over 300 lines because queueing, starting, watching and reaping are one state machine under
one lock; how callers reach the runner is in ``runner_clients``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from service.control.notices import NAMESPACE, actor_name, notify
from service.control.rayjob import rayjob_owner
from service.control.retrain_triggers import Firing, PolicyWatch
from service.settings import RefitSettings
from training.job_settings import TrainingSettings
from training.ray_train import cluster_env, release_placement_groups
from training.spec import FinetuneSpec, parse_spec
from training.storage.errors import ConflictError, DataError, RefitError, TooManyJobsError
from training.storage.ids import new_job_id
from training.storage.job_lease import JobLease, lease_live
from training.storage.job_records import JobRecord, JobState, JobStore
from training.storage.location import S3Settings
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)


class JobProcess:
    """One job, start to end, in its own actor process (owned by the runner). It gets the
    store's location and the training limits only: no API tokens leave the service. Its
    imports happen at creation, so a process the runner started ahead (warm) begins the job
    at once."""

    def __init__(self) -> None:
        import training.finetune  # noqa: F401  # torch, torchvision, Ray Train

    def ready(self) -> bool:
        """True once the process is up (an error if it died)."""
        return True

    def run(
        self,
        job_id: str,
        spec_json: dict[str, Any],
        s3: S3Settings,
        training: TrainingSettings,
        owner: str,
    ) -> dict[str, Any]:
        """Run the job under the runner's lease token; the record ends succeeded or failed
        either way."""
        from training.finetune import run_finetune

        spec = parse_spec(spec_json, training)
        # the replicas hear of the new version (and of its graphs) as soon as it is live
        location = RefitSettings(s3=s3)
        result = run_finetune(
            spec,
            s3=s3,
            training=training,
            job_id=job_id,
            owner=owner,
            on_published=lambda model: notify(location, model),
        )
        return {k: result[k] for k in ("job_id", "version", "published", "promoted")}


def _process_name(job_id: str) -> str:
    return f"refit-{job_id}"


def _warm_name(token: str) -> str:
    # a warm process runs the job whose owner is the runner's prefix + this token, so a
    # successor finds it by the job record's owner
    return f"refit-warm-{token}"


def _job_process(name: str) -> Any:
    # owned by the runner: if the runner dies, the job's process goes with it
    return (
        ray.remote(num_cpus=0, max_restarts=0)(JobProcess)
        .options(name=name, namespace=NAMESPACE, runtime_env={"env_vars": cluster_env()})
        .remote()
    )


class JobRunner:
    """The queue and the running jobs of one store location (a threaded actor)."""

    def __init__(
        self,
        settings: RefitSettings,
        launcher: Any = None,
        notify_published: Callable[[RefitSettings, str], None] = notify,
    ) -> None:
        """``launcher``: where jobs run (None: a Ray task each, or a RayJob per the settings);
        ``notify_published``: how replicas hear of a version a job published."""
        self.settings = settings
        self.notify_published = notify_published
        self.jobs = JobStore(ObjectStore(settings.s3))
        self.queue: list[str] = []
        self.model_of: dict[str, str] = {}
        self.running: dict[str, Any] = {}  # job id -> ObjectRef of its run (None: a RayJob)
        self.processes: dict[str, Any] = {}  # job id -> its JobProcess actor
        # a JobProcess started ahead of the next job (warm): its token, handle and ready() ref
        self.spare: tuple[str, Any, Any] | None = None
        self.leases: dict[str, JobLease] = {}  # job id -> this runner's lease on it
        self.watching: dict[str, float] = {}  # job id run by another owner -> next look
        # Leases of runners of this location on this cluster: at most one lives at a time
        # (the actor name is unique), so a record holding one belongs to a dead predecessor.
        session = ray.get_runtime_context().get_session_name() if ray.is_initialized() else "-"
        self.owner_prefix = f"runner:{session}:{actor_name(settings, 'jobs')}:"
        self.launcher: Any = launcher
        if launcher is None and settings.training.launcher == "rayjob":
            from service.control.rayjob import RayJobLauncher

            self.launcher = RayJobLauncher(settings)
        self._next_check: dict[str, float] = {}
        self.policy_watch = PolicyWatch(self.jobs.store, alias=settings.serve.alias)
        self.triggered: set[str] = set()  # queued or running jobs a retrain policy started
        self._next_policy_pass = 0.0
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

    def _policies(self) -> None:
        """Evaluate the retrain policies (every ``policy_check_s``) and queue what fired.
        Store reads happen outside the lock: the API's calls never wait on them."""
        now = time.monotonic()
        if now < self._next_policy_pass:
            return
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
                if self.running[job_id] is None:  # a RayJob: delete it with its cluster
                    self.launcher.stop(job_id)
                    self._next_check[job_id] = 0.0  # reap it on the next pass
                else:
                    # the process, its Train controller and workers (owned below it) go
                    ray.kill(self.processes[job_id])
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
                "warm_process": _warm_name(self.spare[0]) if self.spare else None,
            }

    # --- scheduling -----------------------------------------------------------------------------
    def _take_over(self, record: JobRecord) -> bool:
        """Requeue a running job whose owner is gone (True), or leave it to a live owner
        (False). A lease of a predecessor runner, or of this runner's own RayJob, is void at
        once; another owner's only when it ran out."""
        owner = record.owner
        void = (
            owner is None
            or owner.startswith(self.owner_prefix)
            or (self.launcher is not None and owner == rayjob_owner(record.job_id))
        )
        if not void and lease_live(record):
            return False
        if self.launcher is None:
            self._kill_leftover(record)

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

    def _kill_leftover(self, record: JobRecord) -> None:
        # A process of a previous runner that is still alive must not train beside the retry,
        # and the reservation of its workers must not starve it.
        names = [_process_name(record.job_id)]
        if record.owner and record.owner.startswith(self.owner_prefix):
            names.append(_warm_name(record.owner.removeprefix(self.owner_prefix)))
        for name in names:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        self._release(record.job_id)

    def _release(self, job_id: str) -> None:
        try:
            if release_placement_groups(self.jobs.store, job_id):
                log.info("freed the worker reservation of %s", job_id)
        except Exception as exc:  # best effort; a leak is logged, never fatal
            log.warning("could not free the placement group of %s: %s", job_id, exc)

    def _keep_warm(self) -> None:
        if self.spare is not None and _died(self.spare[2]):
            self.spare = None
        # started while no job runs: its imports must not slow a job's own start
        if (
            self.spare is None
            and not self.running
            and self.launcher is None
            and self.settings.training.warm_job_process
        ):
            token = uuid.uuid4().hex[:12]
            process = _job_process(_warm_name(token))
            self.spare = (token, process, process.ready.remote())

    def _take_spare(self) -> tuple[str, Any, Any] | None:
        """The warm process, unless it died while it waited (None: start one)."""
        spare, self.spare = self.spare, None
        if spare is None or _died(spare[2]):
            return None
        return spare

    def close(self) -> None:
        """Stop scheduling (tests; an actor simply dies)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self.spare is not None:
                ray.kill(self.spare[1])
                self.spare = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                with self._lock:
                    self._reap()
                    self._renew()
                    self._watch()
                    self._start_ready()
                    self._keep_warm()
                self._policies()
            except Exception:  # the scheduler must outlive a flaky store
                log.exception("job scheduler pass failed")

    def _reap(self) -> None:
        if not self.running:
            return
        refs = [r for r in self.running.values() if r is not None]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for job_id, ref in list(self.running.items()):
            failure: Exception | None = None
            if ref is None:  # a RayJob: ask the API server now and then
                if time.monotonic() < self._next_check.get(job_id, 0.0):
                    continue
                self._next_check[job_id] = time.monotonic() + 5.0
                why = self.launcher.ended(job_id)
                if why is None and not self.jobs.get(job_id).cancel_requested:
                    continue
                failure = RuntimeError(f"RayJob ended: {why or 'deleted on cancel'}")
            else:
                if ref not in done:
                    continue
                try:
                    ray.get(ref)
                except Exception as exc:  # the task recorded its own errors; this is the rest
                    failure = exc
            del self.running[job_id]
            self._next_check.pop(job_id, None)
            process = self.processes.pop(job_id, None)
            if process is not None:
                ray.kill(process)  # ends the process now, not when its handle is collected
                self._release(job_id)
            record = self.jobs.get(job_id)
            if process is not None and self._retry(record, failure):
                self.leases.pop(job_id, None)
                self.queue.insert(0, job_id)  # it was first: before jobs queued behind it
                continue
            if not record.terminal:
                record = self._close(record, failure)
            self.leases.pop(job_id, None)
            if not record.terminal:  # another owner took it over: watch it end
                self.watching[job_id] = 0.0
                continue
            self.finished[record.state] += 1
            if record.result and record.result.get("published"):
                # whichever launcher ran it: replicas load the new version now, not at a poll
                self.notify_published(self.settings, record.model)

    def _retry(self, record: JobRecord, failure: Exception | None) -> bool:
        """Requeue a job whose process died under it (killed, out of memory) while it has
        attempts left (``max_failures``): the retry resumes from its last checkpoint, or
        starts again when it had none. Ray Train retries its own workers; this covers the
        in-process path and the process that drives Ray Train."""
        if (
            not isinstance(failure, ray.exceptions.RayActorError)
            or record.terminal
            or record.cancel_requested
            or record.attempts > self.settings.training.max_failures
        ):
            return False
        lease = self.leases.get(record.job_id)
        owner = lease.owner if lease is not None else record.owner
        why = (str(failure).strip().splitlines() or [type(failure).__name__])[0][:200]

        def requeue(r: JobRecord) -> JobRecord | None:
            if r.state != "running" or r.owner != owner or r.cancel_requested:
                return None
            return _requeued(r, f"its process died (attempt {r.attempts}): {why}")

        requeued = self.jobs.update(record.job_id, requeue).state == "queued"
        if requeued:
            log.warning("requeued %s: its process died: %s", record.job_id, why)
        return requeued

    def _close(self, record: JobRecord, failure: Exception | None) -> JobRecord:
        lease = self.leases.get(record.job_id)
        state: JobState = "cancelled" if record.cancel_requested else "failed"
        if record.cancel_requested:
            fields: dict[str, Any] = {
                "reason": f"cancelled on request; checkpoints kept under runs/{record.job_id}"
            }
        else:
            message = f"the job's process ended unexpectedly: {type(failure).__name__}: {failure}"
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
            del self.running[job_id]
            self.leases.pop(job_id, None)
            process = self.processes.pop(job_id, None)
            if process is not None:
                ray.kill(process)
            elif self.launcher is not None:
                self.launcher.stop(job_id)

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
            spare = self._take_spare() if self.launcher is None else None
            owner = (
                rayjob_owner(job_id)
                if self.launcher is not None
                else self.owner_prefix + (spare[0] if spare else uuid.uuid4().hex[:12])
            )
            lease = JobLease(self.jobs, job_id, owner, self.settings.training.job_lease_s)
            try:
                record = lease.acquire()
            except ConflictError as exc:  # cancelled meanwhile, or another owner runs it
                self.spare = spare  # still unused: the next job takes it
                log.info("not starting %s: %s", job_id, exc)
                if not self.jobs.get(job_id).terminal:
                    self.watching[job_id] = 0.0
                    busy.add(model)
                continue
            self.leases[job_id] = lease
            if self.launcher is not None:
                self.launcher.start(job_id, parse_spec(record.spec, self.settings.training))
                self.running[job_id] = None
            else:
                process = spare[1] if spare else _job_process(_process_name(job_id))
                self.processes[job_id] = process
                self.running[job_id] = process.run.remote(
                    job_id, record.spec, self.settings.s3, self.settings.training, owner
                )
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


def _died(ready: Any) -> bool:
    """Whether the process of a ``ready()`` call died (False while it still starts)."""
    if not ray.wait([ready], timeout=0)[0]:
        return False
    try:
        ray.get(ready)
    except Exception as exc:
        log.warning("the warm job process died while it waited: %s", exc)
        return True
    return False


def _flag_cancel(r: JobRecord) -> JobRecord:
    return r.model_copy(update={"cancel_requested": True, "reason": "cancelling"})


def runner_actor(settings: RefitSettings) -> Any:
    """The job runner of this store location (created on first use; detached, so it
    outlives the API replica that created it)."""
    return (
        ray.remote(num_cpus=0, max_restarts=-1)(JobRunner)
        .options(
            name=actor_name(settings, "jobs"),
            max_concurrency=8,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        )
        .remote(settings)
    )


def existing_runner(settings: RefitSettings) -> Any | None:
    """The runner if one exists (never creates one: a metrics scrape must not)."""
    try:
        return ray.get_actor(actor_name(settings, "jobs"), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_actors(settings: RefitSettings) -> None:
    """Kill the runner and the notice actor of this location (tests; ``refit up`` exit)."""
    for kind in ("jobs", "events"):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(actor_name(settings, kind), namespace=NAMESPACE))


__all__ = [
    "JobRunner",
    "existing_runner",
    "runner_actor",
    "stop_actors",
]
