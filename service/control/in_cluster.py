"""The ``ray`` launcher: each job in a job process (an actor) on this Ray cluster.

* The runner owns each job's process, the process the Ray Train controller of a multi-worker
  job, the controller its workers: killing the process (cancel, lost lease) or losing the
  runner takes everything below down. The placement group of the job's workers (or of its
  in-process run), which Ray frees only through the dashboard's State API, the launcher frees
  itself. The checkpoints already on the store stay under ``runs/{job_id}``.
* While no job runs, ``warm_job_processes`` processes wait started, their Python and the
  training imports done, so a job begins at once; one that dies while it waits is replaced. A
  process runs one job and ends with it (nothing of a job outlives it in the next).
* A run's lease token is the runner's prefix (Ray session, store location) and the process's
  token, so a successor runner recognises its predecessor's runs and ends what is left of them
  by name before running the job again.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from service.control.launchers import RunEnd
from service.control.notices import NAMESPACE, actor_name, events_actor, notify
from service.settings import RefitSettings
from training.job_settings import TrainingSettings
from training.ray_train import cluster_env, release_placement_groups
from training.spec import parse_spec
from training.storage.location import S3Settings
from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)


class JobProcess:
    """One job, start to end, in its own actor process (owned by the runner). It gets the
    store's location and the training limits only: no API tokens leave the service. Its
    imports happen at creation, so a process started ahead (warm) begins the job at once."""

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


@dataclass
class _Process:
    """A job process: its token (in the owner and, when warm, the name), its handle, and
    its ``ready()`` call (None: started for a job, not ahead)."""

    token: str
    handle: Any = None
    ready: Any = None

    def died(self) -> bool:
        """Whether a warm process died while it waited (False while it still starts)."""
        if self.ready is None or not ray.wait([self.ready], timeout=0)[0]:
            return False
        try:
            ray.get(self.ready)
        except Exception as exc:
            log.warning("the warm job process died while it waited: %s", exc)
            return True
        return False


class InClusterLauncher:
    """Jobs as job processes on this Ray cluster (the runner's ``ray`` launcher)."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        # leases of runners of this location on this cluster: at most one lives at a time
        # (the runner's actor name is unique), so a record holding one belongs to a dead
        # predecessor
        session = ray.get_runtime_context().get_session_name() if ray.is_initialized() else "-"
        self.owner_prefix = f"runner:{session}:{actor_name(settings, 'jobs')}:"
        self.warm: list[_Process] = []
        self.claimed: dict[str, _Process] = {}
        self.runs: dict[str, tuple[Any, Any]] = {}  # job id -> its process and run() ref
        self.store = ObjectStore(settings.s3)

    def claim(self, job_id: str) -> str:
        """A warm process is set aside for the job (or a token for one started for it)."""
        process = None
        while self.warm and process is None:
            candidate = self.warm.pop(0)
            process = None if candidate.died() else candidate
        self.claimed[job_id] = process or _Process(uuid.uuid4().hex[:12])
        return self.owner_prefix + self.claimed[job_id].token

    def unclaim(self, job_id: str) -> None:
        """A warm process set aside goes back first in line."""
        process = self.claimed.pop(job_id, None)
        if process is not None and process.handle is not None:
            self.warm.insert(0, process)

    def start(self, job_id: str, spec: dict[str, Any], owner: str) -> None:
        """Run the job in its claimed process (or one started now)."""
        process = self.claimed.pop(job_id, None)
        handle = (
            process.handle
            if process is not None and process.handle is not None
            else _job_process(_process_name(job_id))
        )
        t = self.settings
        self.runs[job_id] = (handle, handle.run.remote(job_id, spec, t.s3, t.training, owner))
        # the notice actor the job tells the replicas through once its version is live: it
        # exists wherever replicas run; where none does yet, it starts while the job trains
        # instead of on the job's critical path (a process start, ~1 s on two cores)
        try:
            events_actor(t)
        except Exception as exc:  # best effort: notify() creates it on first use too
            log.warning("could not start the notice actor: %s", exc)

    def poll(self, job_id: str) -> RunEnd | None:
        """The run's end once its ``run()`` returned or its process died; the process is
        ended and the workers' reservation freed then."""
        ref = self.runs[job_id][1]
        if not ray.wait([ref], timeout=0)[0]:
            return None
        end = RunEnd()
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            end = RunEnd(_described(exc), process_died=True)
        except Exception as exc:  # the run recorded its own errors; this is the rest
            end = RunEnd(_described(exc))
        self.forget(job_id)
        return end

    def stop(self, job_id: str) -> None:
        """Kill the job's process: its Train controller and workers (owned below it) go."""
        if job_id in self.runs:
            ray.kill(self.runs[job_id][0])

    def forget(self, job_id: str) -> None:
        """End the process now (not when its handle is collected) and free its reservation."""
        run = self.runs.pop(job_id, None)
        if run is not None:
            ray.kill(run[0])
            self._release(job_id)

    def owns(self, job_id: str, owner: str | None) -> bool:
        """A predecessor runner's lease on this cluster and store location."""
        return owner is not None and owner.startswith(self.owner_prefix)

    def clear(self, job_id: str, owner: str | None) -> None:
        """A process of a previous runner that is still alive must not train beside the
        retry, and the reservation of its workers must not starve it."""
        names = [_process_name(job_id)]
        if owner and owner.startswith(self.owner_prefix):
            names.append(_warm_name(owner.removeprefix(self.owner_prefix)))
        for name in names:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        self._release(job_id)

    def _release(self, job_id: str) -> None:
        try:
            if release_placement_groups(self.store, job_id):
                log.info("freed the worker reservation of %s", job_id)
        except Exception as exc:  # best effort; a leak is logged, never fatal
            log.warning("could not free the placement group of %s: %s", job_id, exc)

    def idle(self, running: int) -> None:
        """Replace warm processes that died; top them up to ``warm_job_processes`` while no
        job runs (their imports must not slow a job's own start)."""
        self.warm = [p for p in self.warm if not p.died()]
        if running:
            return
        while len(self.warm) < self.settings.training.warm_job_processes:
            token = uuid.uuid4().hex[:12]
            handle = _job_process(_warm_name(token))
            self.warm.append(_Process(token, handle, handle.ready.remote()))

    def stats(self) -> dict[str, Any]:
        """The warm processes' names."""
        return {"warm_processes": [_warm_name(p.token) for p in self.warm]}

    def close(self) -> None:
        """Kill the warm processes."""
        for process in self.warm:
            ray.kill(process.handle)
        self.warm = []


def _described(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


__all__ = ["InClusterLauncher", "JobProcess"]
