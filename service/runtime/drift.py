"""The drift score of served inputs, measured off the request path.

After a forward pass the request path only draws which images to sample (one random number
each, on the event loop) and offers their preprocessed tensors to a bounded queue; one thread
runs the version's eager trunk on them, measures each image's distance from the version's
reference features (``training.feature_stats``) and keeps the last ``window`` outcomes per
model and version. A full queue drops the sample and counts it: drift never slows a
prediction. The same thread writes the windows to the store (``drift/{model}/{version}/``)
for the quality endpoint and the job runner's ``drift_above`` trigger.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from service.runtime.served_model import ServedModel
from training.storage.drift_scores import HEARTBEAT_S, DriftScores, DriftWindow

log = logging.getLogger(__name__)

VERSIONS_KEPT = 2
"""Windows per model a replica keeps: the serving version and the one it replaced."""


@dataclass
class _Window:
    threshold: float
    expected: float
    distances: collections.deque[float]
    total: int = 0
    changed: bool = False
    written_at: float = 0.0

    def outliers(self) -> int:
        return sum(d > self.threshold for d in self.distances)


@dataclass
class DriftMonitor:
    """Samples served images, scores them on its own thread, writes the windows."""

    scores: DriftScores
    sample_rate: float
    queue_size: int
    window: int
    flush_s: float
    replica: str = field(default_factory=lambda: f"r{os.getpid()}-{secrets.token_hex(4)}")
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._queue: queue.Queue[tuple[ServedModel, torch.Tensor]] = queue.Queue(
            maxsize=max(1, self.queue_size)
        )
        self._windows: dict[tuple[str, str], _Window] = {}
        self._dropped: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()  # a sample is being scored (flush() waits for it)

    def observe(self, served: ServedModel, x: torch.Tensor) -> None:
        """Offer a sample of one forward pass's images (non-blocking: on the event loop)."""
        if served.reference is None or self.sample_rate <= 0:
            return
        picks = [i for i in range(x.shape[0]) if self.rng.random() < self.sample_rate]
        if not picks:
            return
        self._start()
        try:
            self._queue.put_nowait((served, x[picks]))  # indexing by a list copies the rows
        except queue.Full:
            self._dropped[served.name] += len(picks)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._drain, name="refit-drift", daemon=True
                    )
                    self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                served, x = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                self._flush()
                continue
            self._busy.set()
            try:
                self._measure(served, x)
            except Exception as exc:  # a failing sample must never stop the thread
                log.warning("drift of %s %s: %s", served.name, served.version, exc)
            finally:
                self._queue.task_done()
                self._busy.clear()
            self._flush(due_only=True)

    def _measure(self, served: ServedModel, x: torch.Tensor) -> None:
        distances = served.feature_distances(x)
        record = served.manifest.drift
        if distances is None or record is None:
            return
        key = (served.name, served.version)
        gone = []
        with self._lock:
            if key not in self._windows:
                # batches of the old version may still arrive after a swap: keep the last
                # VERSIONS_KEPT windows per model, write the oldest once more, then forget it
                mine = [k for k in self._windows if k[0] == served.name]
                for old_key in mine[: max(0, len(mine) - VERSIONS_KEPT + 1)]:
                    old = self._windows.pop(old_key)
                    gone.append((self._record(old_key, old), old))
                self._windows[key] = _Window(
                    record.threshold, 1.0 - record.quantile, collections.deque(maxlen=self.window)
                )
            w = self._windows[key]
            w.distances.extend(float(d) for d in distances)
            w.total += len(distances)
            w.changed = True
        for window, old in gone:
            self._put(window, old)

    def _flush(self, *, due_only: bool = False) -> None:
        now = time.monotonic()
        with self._lock:  # the records under the lock, the writes outside it
            due = [
                (self._record(key, w), w)
                for key, w in self._windows.items()
                if (w.changed and (not due_only or now - w.written_at >= self.flush_s))
                or now - w.written_at >= HEARTBEAT_S
            ]
        for window, w in due:
            self._put(window, w)

    def _record(self, key: tuple[str, str], w: _Window) -> DriftWindow:
        n = len(w.distances)
        w.changed = False  # samples measured from here on are written next time
        return DriftWindow(
            model=key[0],
            version=key[1],
            replica=self.replica,
            updated_at=datetime.now(UTC),
            samples=n,
            outliers=w.outliers(),
            mean_distance=sum(w.distances) / n if n else None,
            threshold=w.threshold,
            expected=round(w.expected, 6),
            total_samples=w.total,
            dropped=self._dropped[key[0]],
        )

    def _put(self, window: DriftWindow, w: _Window) -> None:
        try:
            self.scores.put(window)
        except Exception as exc:  # the store failing must never stop the thread
            w.changed = True  # try again at the next flush
            log.warning("drift window of %s %s not stored: %s", window.model, window.version, exc)
            return
        w.written_at = time.monotonic()

    def flush(self, timeout: float = 10.0) -> bool:
        """Score everything queued so far and write every window (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while (self._queue.unfinished_tasks or self._busy.is_set()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        self._flush()
        return not self._queue.unfinished_tasks

    def snapshot(self) -> dict[str, dict[str, float | int | str | None]]:
        """Per model, this replica's window of its latest version (for /metrics)."""
        out: dict[str, dict[str, float | int | str | None]] = {}
        with self._lock:
            for (model, version), w in self._windows.items():
                n = len(w.distances)
                out[model] = {
                    "version": version,
                    "score": w.outliers() / n if n else None,
                    "samples": w.total,
                    "dropped": self._dropped[model],
                }
        return out
