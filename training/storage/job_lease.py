"""Who runs a job: a lease on its record, so that one job is run by exactly one owner.

A lease is the record's ``owner`` (a token naming the runner, the ``refit finetune --local``
process or the RayJob that runs it) and ``lease_expires_at`` (epoch seconds). It is taken
and renewed by compare-and-swap on the record, like every other change:

* a queued job, a running job whose lease has expired (its owner died or lost the store) or a
  job the caller already owns can be taken; a running job with a live lease of another owner
  cannot (ConflictError naming ``job_id``);
* the owner renews it every quarter of its length (:meth:`JobLease.heartbeat`); a renewal that
  finds another owner, or no renewal for a whole length, means the lease is lost: the owner
  must not publish, move an alias or record the job's end (:meth:`JobLease.check`), because
  whoever took it over will;
* only the owner moves the record to its end (:meth:`JobLease.finish`).

Expiry compares clocks of different hosts: the length (``REFIT_TRAINING__JOB_LEASE_S``, a
minute by default) is chosen far above any sane clock skew.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from training.storage.errors import ConflictError, RefitError
from training.storage.jobs import JobRecord, JobState, JobStore, now_iso

log = logging.getLogger(__name__)


class LeaseLostError(ConflictError):
    """Another owner took the job over (or this one could not renew its lease in time)."""

    code = "lease_lost"


class JobCancelledError(ConflictError):
    """A cancel was requested while the job ran (seen at the owner's next check)."""

    code = "cancelled"


def new_owner(kind: str) -> str:
    """A fresh owner token: ``kind:host:pid:random`` (unique, and says who to look for)."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def lease_live(record: JobRecord, now: float | None = None) -> bool:
    """Whether the record is held by an owner whose lease has not expired."""
    expires = record.lease_expires_at
    return record.owner is not None and expires is not None and expires > (now or time.time())


class JobLease:
    """One owner's lease on one job record."""

    def __init__(self, jobs: JobStore, job_id: str, owner: str, ttl_s: float) -> None:
        self.jobs, self.job_id, self.owner, self.ttl_s = jobs, job_id, owner, ttl_s
        self.expires_at = 0.0
        self.lost: str | None = None
        self.cancel_requested = False
        self._renewed_at = 0.0

    def acquire(self) -> JobRecord:
        """Take the job and move it to running (ConflictError when it ended or another
        owner's lease is live). Taking it from someone else counts as an attempt."""

        def change(r: JobRecord) -> JobRecord:
            if r.terminal:
                raise ConflictError(f"job {r.job_id} already {r.state}", field="job_id")
            now = time.time()
            if r.owner != self.owner and r.state == "running" and lease_live(r, now):
                raise ConflictError(
                    f"job {r.job_id} is being run by {r.owner} (lease until "
                    f"{r.lease_expires_at:.0f})",
                    field="job_id",
                )
            taken = r.owner != self.owner or r.state != "running"
            return r.model_copy(
                update={
                    "state": "running",
                    "reason": None,
                    "owner": self.owner,
                    "lease_expires_at": now + self.ttl_s,
                    "attempts": r.attempts + (1 if taken else 0),
                    "started_at": r.started_at or now_iso(),
                }
            )

        started = time.time()
        record = self.jobs.update(self.job_id, change)
        self.expires_at, self._renewed_at = started + self.ttl_s, time.monotonic()
        self.cancel_requested = record.cancel_requested
        return record

    def due(self) -> bool:
        """Whether a quarter of the lease has passed since the last renewal."""
        return time.monotonic() - self._renewed_at >= self.ttl_s / 4

    def renew(self) -> bool:
        """Extend the lease; False (and :attr:`lost` set) when another owner holds the job or
        it ended. A store error is logged and leaves the lease to run out."""
        mine = True

        def change(r: JobRecord) -> JobRecord | None:
            nonlocal mine
            if r.terminal or r.owner != self.owner:
                mine = False
                return None
            self.cancel_requested = r.cancel_requested
            return r.model_copy(update={"lease_expires_at": started + self.ttl_s})

        started = time.time()
        try:
            record = self.jobs.update(self.job_id, change)
        except RefitError as exc:
            log.warning("could not renew the lease of %s: %s", self.job_id, exc)
            return self.lost is None
        if not mine:
            self.lost = f"job {self.job_id} is now {record.state}, owned by {record.owner}"
            log.warning("lost the lease of %s: %s", self.job_id, self.lost)
            return False
        self.expires_at, self._renewed_at = started + self.ttl_s, time.monotonic()
        return True

    def check(self) -> None:
        """Before a step others must not repeat (publish, alias move): LeaseLostError when the
        lease is lost or ran out unrenewed, JobCancelledError when a cancel was requested."""
        if self.lost is None and time.time() >= self.expires_at:
            self.lost = f"the lease of job {self.job_id} ran out before it could be renewed"
        if self.lost is not None:
            raise LeaseLostError(self.lost, field="job_id")
        if self.cancel_requested:
            raise JobCancelledError(f"job {self.job_id} was cancelled", field="job_id")

    def finish(self, state: JobState, **fields: Any) -> JobRecord | None:
        """Move the record to its end if this owner still holds it (else None: the owner
        that took it over records the end)."""

        def change(r: JobRecord) -> JobRecord | None:
            if r.terminal or r.owner != self.owner:
                return None
            return r.model_copy(
                update={"state": state, "finished_at": now_iso(), "lease_expires_at": None} | fields
            )

        record = self.jobs.update(self.job_id, change)
        return record if record.owner == self.owner and record.state == state else None

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[JobLease]:
        """Renew the lease from a thread while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 4):
                if not self.renew() and self.lost is not None:
                    return

        thread = threading.Thread(target=beat, daemon=True, name=f"lease-{self.job_id}")
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)


__all__ = ["JobCancelledError", "JobLease", "LeaseLostError", "lease_live", "new_owner"]
