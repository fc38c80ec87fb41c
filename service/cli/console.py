"""What ``refit up`` shows on its console, and where the rest goes.

The console carries what a user acts on: the URL, where the tokens are, the demo's progress,
and each job's start, epochs and end (:class:`JobConsole`, read from the job records, so jobs
run by the service's job processes show too). Ray's own output goes to files under the data
dir (:func:`ray_output_to_files`): its driver loggers to ``logs/ray-driver.log``, and a link
``logs/ray`` to the session's logs, where every Ray process writes (``log_to_driver`` off).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.storage.errors import RefitError
from training.storage.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How often the job records are read: one list of the active markers, plus a read of each
running job's record and progress."""


def ray_output_to_files(logs: Path, session_logs: Path | None) -> Path:
    """Send the ``ray`` loggers of this process to ``logs/ray-driver.log`` instead of the
    console, and link ``logs/ray`` to the session's logs (when known). Call it after ``import
    ray`` (which adds Ray's console handler) and before ``ray.init``, and again after a Ray
    library adds its own (Serve does when it starts). Returns the driver log's path."""
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "ray-driver.log"
    names = [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    loggers = [logging.getLogger(n) for n in names]
    # one handler for every call and logger: the file is opened once, written in order
    to_file = next(
        (h for lg in loggers for h in lg.handlers if getattr(h, "baseFilename", None) == str(path)),
        None,
    )
    if to_file is None:
        to_file = logging.FileHandler(path, delay=True)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    for logger in loggers:
        consoles = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for handler in consoles:
            logger.removeHandler(handler)
        if (consoles or logger.name == "ray") and to_file not in logger.handlers:
            logger.addHandler(to_file)
    link = logs / "ray"
    if session_logs is not None:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session_logs, target_is_directory=True)
    return path


@dataclass
class _Seen:
    state: str
    epochs: int = 0


class JobConsole:
    """Prints each job's start, epochs and end from the store's records (``poll`` once, or
    ``start`` a thread). Jobs that end between two polls are still reported, from the record
    of every job id newer than the last one seen."""

    def __init__(self, jobs: JobStore, emit: Callable[[str], None]) -> None:
        self.jobs, self.emit = jobs, emit
        self.seen: dict[str, _Seen] = {}
        self.newest: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread's polls and a caller's
        self._started = False

    def _new_ids(self) -> list[str]:
        """Ids of records created since the last poll (all existing ones at the first)."""
        start = f"jobs/{self.newest}.json" if self.newest else None
        ids = []
        for obj in self.jobs.store.list("jobs/", start_after=start):
            name = obj.key.removeprefix("jobs/")
            if "/" not in name and name.endswith(".json"):
                ids.append(name.removesuffix(".json"))
        return ids

    def poll(self) -> None:
        """Report what changed since the last call (from any thread)."""
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        new = self._new_ids()
        if new:
            self.newest = max(new)
        if not self._started:
            # jobs that ended before this console started are history, not news: only the
            # marked (queued or running) ones are read, never every record ever written
            self._started = True
            active = set(self.jobs.active_ids())
            new = [j for j in new if j in active]
        watch = set(new) | {j for j, s in self.seen.items() if s.state in ("queued", "running")}
        for job_id in sorted(watch):
            self._report(self.jobs.get(job_id))

    def _report(self, record: JobRecord) -> None:
        seen = self.seen.get(record.job_id)
        name = f"job {record.job_id} ({record.model})"
        if seen is None:
            seen = self.seen[record.job_id] = _Seen("new")
            why = f", trigger: {record.trigger.detail}" if record.trigger else ""
            self.emit(f"{name} queued{why}")
        if record.started_at is not None and seen.state in ("new", "queued"):
            self.emit(f"{name} started")
        progress = self.jobs.progress(record.job_id).get("progress") or {}
        for epoch in progress.get("history", []):
            if int(epoch["epoch"]) > seen.epochs:
                seen.epochs = int(epoch["epoch"])
                self.emit(f"{name} {_epoch_line(epoch, progress)}")
        if record.terminal and seen.state not in ("succeeded", "failed", "cancelled"):
            self.emit(f"{name} {_end_line(record)}")
        seen.state = record.state

    def start(self) -> None:
        """Poll every :data:`POLL_S` in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="job-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except (RefitError, OSError) as exc:  # the console never stops the service
                log.debug("job console: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _epoch_line(epoch: dict[str, Any], progress: dict[str, Any]) -> str:
    parts = [f"epoch {epoch['epoch']}/{progress.get('epochs', '?')}"]
    if "train_loss" in epoch:
        parts.append(f"loss {epoch['train_loss']:.4f}")
    if "val_top1" in epoch:
        parts.append(f"val top1 {epoch['val_top1']:.4f}")
    if "images_per_s" in epoch:
        parts.append(f"{epoch['images_per_s']:.0f} img/s")
    return " ".join(parts)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} KB"


def _stored(result: dict[str, Any]) -> str:
    """What the version's weights wrote to the store and what they share with versions
    stored before (its parent's frozen stages: one file for both)."""
    w = result.get("weights")
    if not isinstance(w, dict) or not w.get("shared_stages"):
        return ""
    return (
        f"; its weights wrote {_megabytes(w['written_bytes'])} "
        f"({', '.join(w['written_stages'])}) and share {_megabytes(w['shared_bytes'])} "
        f"({', '.join(w['shared_stages'])}) with {', '.join(w['shared_with'])}"
    )


def _end_line(record: JobRecord) -> str:
    result = record.result or {}
    if record.state == "succeeded" and result.get("published"):
        return f"succeeded: version {result.get('version')} is live{_stored(result)}"
    if record.state == "succeeded":
        return f"succeeded, not published: {record.reason or 'the gate refused it'}"
    if record.state == "failed":
        error = record.error or {}
        return f"failed: {error.get('message') or record.reason}"
    return f"{record.state}: {record.reason or ''}".rstrip(": ")
