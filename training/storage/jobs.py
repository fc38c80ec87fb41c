"""Fine-tune job records on the object store: ``jobs/{job_id}.json``.

States: ``queued -> running -> succeeded | failed | cancelled`` (a queued job may also be
cancelled). Every change is a compare-and-swap on the record's ETag, so the API, the job runner
and the job itself never overwrite each other, and a terminal state is final. Progress lives
beside the record (``jobs/{id}/progress.json`` per epoch from the Ray Train controller,
``jobs/{id}/step.json`` within an epoch from rank 0) so the hot path never rewrites it.

``jobs/active/{id}`` marks a job that has not ended: written before its record, deleted after
the record turns terminal. A runner's start-up scan and the queued/running listings read only
the marked records, not every job ever run; a marker a crash left behind (no record, or an
ended one) is removed when a scan meets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from training.storage.errors import ConflictError, IntegrityError, NotFoundError, StorageError
from training.storage.ids import is_id, new_job_id
from training.storage.s3 import ObjectStore

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
_RECORD_KEY = re.compile(r"^jobs/([^/]+)\.json$")
_ACTIVE = "jobs/active/"
log = logging.getLogger(__name__)


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat()


def _sha256(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


class JobSpec(Protocol):
    """What a record needs of a fine-tune spec (``training.spec.JobSpec``): the storage
    contract does not depend on the training library's types."""

    @property
    def model(self) -> str:
        """The model the job trains."""
        ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]:
        """The spec as JSON-ready data."""
        ...


TriggerKind = Literal["every_n_labels", "accuracy_below", "drift_above", "schedule"]


class JobTrigger(BaseModel):
    """Why a retrain policy started a job (a job created through the API has none)."""

    model_config = ConfigDict(extra="forbid")

    kind: TriggerKind
    detail: str
    """What was measured against what (``212 labels >= every_n_labels 200``)."""
    fired_at: str
    serving_version: str
    """The version the job fine-tunes from (and the gate compares with)."""
    dataset: dict[str, Any] = {}
    """Images per source and split in the job's dataset (base and feedback)."""


class JobRecord(BaseModel):
    """One job: what was asked, where it stands, and how it ended."""

    model_config = ConfigDict(extra="ignore")
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    """The spec, the result (metrics with a confusion matrix, the gate's reasons) and the
    error fit in a few tens of KB; a larger object was not written by Refit."""

    job_id: str
    model: str
    state: JobState
    reason: str | None = None
    """Why the job is in its state (queued behind, gate decision, error, cancel)."""
    spec: dict[str, Any]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    """How many times a runner started it (a restarted runner requeues running jobs)."""
    owner: str | None = None
    """Who runs it (``training.storage.job_lease``): a runner, a local CLI run or a RayJob."""
    lease_expires_at: float | None = None
    """Epoch seconds until which the owner's lease holds unless renewed."""
    idempotency_key_sha256: str | None = None
    trigger: JobTrigger | None = None
    """The retrain policy's trigger that started the job, if one did."""
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (its state never changes again)."""
        return self.state in TERMINAL


class JobStore:
    """Create, read, list and change job records (CAS on every change)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def key(job_id: str) -> str:
        """The record's key (the id is checked: it never becomes an arbitrary path)."""
        if not is_id(job_id):
            raise NotFoundError(f"no job {job_id!r}", field="job_id")
        return f"jobs/{job_id}.json"

    @staticmethod
    def progress_key(job_id: str) -> str:
        """The latest epoch report with the per-epoch history (the Ray Train controller's)."""
        return f"jobs/{job_id}/progress.json"

    @staticmethod
    def step_key(job_id: str) -> str:
        """Rank 0's latest step report within the epoch."""
        return f"jobs/{job_id}/step.json"

    @staticmethod
    def placement_groups_prefix(job_id: str) -> str:
        """Where a run records the placement groups it reserved (one empty object each)."""
        return f"jobs/{job_id}/placement_groups/"

    @staticmethod
    def run_prefix(job_id: str) -> str:
        """Ray Train's storage of the job's runs (checkpoints): ``runs/{job_id}``."""
        return f"runs/{job_id}"

    @staticmethod
    def _hashes(spec: JobSpec, idempotency_key: str) -> tuple[str, str]:
        spec_hash = _sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True))
        return f"jobs/idempotency/{_sha256(idempotency_key)}.json", spec_hash

    def find_idempotent(self, spec: JobSpec, idempotency_key: str) -> JobRecord | None:
        """The job an ``Idempotency-Key`` created before, or None. The same key with another
        spec is a ConflictError naming ``Idempotency-Key``."""
        claim_key, spec_hash = self._hashes(spec, idempotency_key)
        try:
            claim = self.store.get_json(claim_key)
        except NotFoundError:
            return None
        if claim.get("spec_sha256") != spec_hash:
            raise ConflictError(
                "this Idempotency-Key was used with a different spec", field="Idempotency-Key"
            )
        try:
            return self.get(claim["job_id"])
        except NotFoundError:
            # the claimer died between its two writes; the claim is stale
            self.store.delete(claim_key)
            return None

    def create(
        self,
        spec: JobSpec,
        *,
        idempotency_key: str | None = None,
        job_id: str | None = None,
        trigger: JobTrigger | None = None,
    ) -> tuple[JobRecord, bool]:
        """A new queued record (a new id unless ``job_id`` is given), or - for an
        ``Idempotency-Key`` seen before with the same spec - the job it created. Returns
        ``(record, created)``."""
        record = JobRecord(
            job_id=job_id or new_job_id(),
            model=spec.model,
            state="queued",
            reason="queued",
            spec=spec.model_dump(mode="json"),
            created_at=now_iso(),
            trigger=trigger,
        )
        if idempotency_key is not None:
            known = self.find_idempotent(spec, idempotency_key)
            if known is not None:
                return known, False
            claim_key, spec_hash = self._hashes(spec, idempotency_key)
            record.idempotency_key_sha256 = claim_key.rsplit("/", 1)[1].removesuffix(".json")
            # Claim the key first: of two racing creates only one wins the conditional write.
            try:
                self.store.put_json(
                    claim_key,
                    {"job_id": record.job_id, "spec_sha256": spec_hash},
                    if_none_match=True,
                )
            except ConflictError:
                known = self.find_idempotent(spec, idempotency_key)
                if known is None:
                    raise StorageError("idempotency record unreadable; retry") from None
                return known, False
        # marker first: a crash between the writes leaves a marker without a record (removed
        # by the next scan), never a queued record that no scan would find
        self.store.put_bytes(_ACTIVE + record.job_id, b"")
        self.store.put_record(self.key(record.job_id), record, if_none_match=True)
        return record, True

    def get(self, job_id: str) -> JobRecord:
        """The record (NotFoundError naming ``job_id``)."""
        try:
            return self.store.get_record(self.key(job_id), JobRecord, names={"job_id": job_id})
        except NotFoundError:
            raise NotFoundError(f"no job {job_id!r}", field="job_id") from None

    def update(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None], *, attempts: int = 8
    ) -> JobRecord:
        """Apply ``change`` to the current record and write it if the record did not change
        meanwhile (else re-read and retry). ``change`` returns None to leave it as it is."""
        key = self.key(job_id)
        for _ in range(attempts):
            try:
                current, etag = self.store.get_record_with_etag(
                    key, JobRecord, names={"job_id": job_id}
                )
            except NotFoundError:
                raise NotFoundError(f"no job {job_id!r}", field="job_id") from None
            updated = change(current.model_copy(deep=True))
            if updated is None:
                return current
            try:
                self.store.put_record(key, updated, if_match=etag)
            except ConflictError:
                continue
            if updated.terminal and not current.terminal:
                self.store.delete(_ACTIVE + job_id)
            return updated
        raise ConflictError(f"job {job_id} keeps changing; retry", field="job_id")

    def transition(self, job_id: str, state: JobState, **fields: Any) -> JobRecord:
        """Move a job to ``state`` unless it already ended (terminal states are final)."""

        def change(r: JobRecord) -> JobRecord | None:
            if r.terminal:
                return None
            stamp: dict[str, Any] = {}
            if state == "running" and r.started_at is None:
                stamp["started_at"] = now_iso()
            if state in TERMINAL:
                stamp["finished_at"] = now_iso()
            return r.model_copy(update={"state": state, **stamp, **fields})

        return self.update(job_id, change)

    def list_jobs(self, *, limit: int = 50, state: str | None = None) -> list[JobRecord]:
        """Records, newest first (job ids sort by creation time). Queued and running jobs
        come from the active markers, not from reading every record."""
        if state is not None and state not in TERMINAL:
            return [r for r in reversed(self.unfinished()) if r.state == state][:limit]
        ids = sorted(
            (m.group(1) for o in self.store.list("jobs/") if (m := _RECORD_KEY.match(o.key))),
            reverse=True,
        )
        out = []
        for job_id in ids:
            try:
                record = self.get(job_id)
            except NotFoundError:
                continue
            except IntegrityError as exc:  # one damaged record does not hide the others
                log.warning("job record skipped: %s", exc)
                continue
            if state is None or record.state == state:
                out.append(record)
            if len(out) >= limit:
                break
        return out

    def active_ids(self) -> list[str]:
        """Ids of the jobs marked queued or running (one listing; nothing read or removed:
        a marker may outlive its record's end for a moment)."""
        return sorted(o.key[len(_ACTIVE) :] for o in self.store.list(_ACTIVE))

    def unfinished(self) -> list[JobRecord]:
        """Queued and running records, oldest first (a runner's start-up scan), from the
        active markers; stale markers are removed."""
        out = []
        for job_id in self.active_ids():
            try:
                record = self.get(job_id)
            except NotFoundError:
                record = None
            except IntegrityError as exc:  # left as it is: nothing can run it
                log.warning("job record skipped: %s", exc)
                continue
            if record is None or record.terminal:
                self.store.delete(_ACTIVE + job_id)
                continue
            out.append(record)
        return out

    def progress(self, job_id: str) -> dict[str, Any]:
        """The latest epoch report (with the history of all epochs) and the latest step."""
        out: dict[str, Any] = {}
        for name, key in (("progress", self.progress_key), ("step", self.step_key)):
            try:
                out[name] = self.store.get_json(key(job_id))
            except NotFoundError:
                out[name] = None
        return out


def progress_view(raw: dict[str, Any]) -> dict[str, Any]:
    """What a client needs from :meth:`JobStore.progress`: the epoch and step now running,
    throughput, ETA, the latest metrics and the per-epoch history (the training curve)."""
    epoch_report = raw.get("progress") or {}
    step = raw.get("step") or {}
    done = int(epoch_report.get("epoch", 0))
    epochs = int(epoch_report.get("epochs") or step.get("epochs") or 0)
    view: dict[str, Any] = {
        "epochs_done": done,
        "epochs": epochs or None,
        "epoch": done,
        "step": None,
        "steps_per_epoch": epoch_report.get("steps_per_epoch") or step.get("steps_per_epoch"),
        "images_per_s": epoch_report.get("images_per_s"),
        "eta_s": epoch_report.get("eta_s"),
        "metrics": {
            k: epoch_report[k]
            for k in ("train_loss", "val_loss", "val_top1", "val_top5", "best_top1", "best_epoch")
            if k in epoch_report
        },
        "history": epoch_report.get("history", []),
    }
    # a step report newer than the last finished epoch: the epoch in progress (1-based)
    if step and int(step.get("epoch", -1)) >= done:
        view.update(epoch=int(step["epoch"]) + 1, step=step.get("step"))
        view["images_per_s"] = step.get("images_per_s", view["images_per_s"])
    return view


__all__ = ["STATES", "TERMINAL", "JobRecord", "JobState", "JobStore", "now_iso", "progress_view"]
