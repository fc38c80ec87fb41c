"""Where the job runner's jobs run: one interface, two launchers.

* :class:`~service.control.in_cluster.InClusterLauncher` (``REFIT_TRAINING__LAUNCHER=ray``):
  each job in a job process on this Ray cluster, warm ones started ahead.
* :class:`~service.control.rayjob.RayJobLauncher` (``rayjob``): each job as a KubeRay RayJob,
  an isolated cluster created through the Kubernetes API.

The runner (:class:`~service.control.scheduler.JobRunner`) holds the queue, the leases and
the records; it reaches the machinery only through :class:`Launcher`, so its state machine is
tested with a fake launcher and no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, as its launcher saw it (the record says how the job ended)."""

    error: str | None = None
    """None: the run returned; else what ended it (``Type: message``)."""
    process_died: bool = False
    """The process under the job died (killed, out of memory): a retry may resume it."""


class Launcher(Protocol):
    """What the job runner asks of the place its jobs run. Calls come from the runner's
    scheduling thread, under its lock; none blocks for long."""

    def claim(self, job_id: str) -> str:
        """The lease owner token the job will run under (the in-cluster launcher sets a warm
        process aside for it here)."""
        ...

    def unclaim(self, job_id: str) -> None:
        """The claimed job will not start (its lease was refused): undo :meth:`claim`."""
        ...

    def start(self, job_id: str, spec: dict[str, Any], owner: str) -> None:
        """Start the job (its record's spec) under the lease token ``owner``."""
        ...

    def poll(self, job_id: str) -> RunEnd | None:
        """None while the run goes on; how it ended once it has (what it held is freed)."""
        ...

    def stop(self, job_id: str) -> None:
        """Stop a run (cancel, or a lease another owner took); :meth:`poll` reports the end."""
        ...

    def forget(self, job_id: str) -> None:
        """The runner no longer follows the run (stopped after a lost lease): free it."""
        ...

    def owns(self, job_id: str, owner: str | None) -> bool:
        """Whether a record's owner token is a run of this launcher whose driver is gone (a
        predecessor runner's): its lease is void at once, not when it runs out."""
        ...

    def clear(self, job_id: str, owner: str | None) -> None:
        """Before a job taken over from ``owner`` runs again: end what is left of that run."""
        ...

    def idle(self, running: int) -> None:
        """Each scheduling pass, with the number of runs going on: prepare the next start."""
        ...

    def stats(self) -> dict[str, Any]:
        """What the launcher holds, for the runner's stats."""
        ...

    def close(self) -> None:
        """Release what :meth:`idle` prepared (tests; an actor simply dies)."""
        ...


__all__ = ["Launcher", "RunEnd"]
