"""Capture of served predictions, off the request path.

The request path only decides (a few comparisons and a random draw, on the event loop) and
offers the chosen images to a bounded queue; one writer thread stores them. A full queue drops
the capture and counts it: a slow store never slows a prediction. Policies are read from the
store by the same thread, at most every ``refresh_s`` per model; until one is read, the
settings' default policy applies.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from training.storage.captures import (
    CapturedLabel,
    CapturePolicy,
    CaptureReason,
    CaptureRecord,
    Captures,
    ImageKind,
    hour_of,
)

log = logging.getLogger(__name__)

_MAGIC: tuple[tuple[bytes, ImageKind], ...] = ((b"\xff\xd8", "jpg"), (b"\x89PNG", "png"))


def image_kind(data: bytes) -> ImageKind | None:
    """The stored file type of an encoded request image (JPEG, PNG, WebP), else None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class Sampler:
    """Which predictions of one model a policy keeps, with its per-hour caps (counted in
    this process: N replicas keep at most N times the caps)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()  # noqa: S311  # sampling, not secrets
        self._hour = ""
        self._total = 0
        self._per_class: collections.Counter[str] = collections.Counter()

    def choose(
        self, policy: CapturePolicy, ranked: list[dict[str, Any]], now: datetime
    ) -> CaptureReason | None:
        """Why this prediction (its ranked labels, best first) is kept, or None."""
        if not ranked or not policy.enabled:
            return None
        top1 = float(ranked[0]["score"])
        top2 = float(ranked[1]["score"]) if len(ranked) > 1 else 0.0
        reason: CaptureReason | None = None
        if policy.low_confidence_below is not None and top1 < policy.low_confidence_below:
            reason = "low_confidence"
        elif policy.margin_below is not None and top1 - top2 < policy.margin_below:
            reason = "low_margin"
        elif policy.rate > 0 and self.rng.random() < policy.rate:
            reason = "random"
        if reason is None:
            return None
        hour = hour_of(now)
        if hour != self._hour:
            self._hour, self._total = hour, 0
            self._per_class.clear()
        label = str(ranked[0]["label"])
        cap = policy.max_per_class_per_hour
        if self._total >= policy.max_per_hour or (
            cap is not None and self._per_class[label] >= cap
        ):
            return None
        self._total += 1
        self._per_class[label] += 1
        return reason


@dataclass(frozen=True)
class _Job:
    record: CaptureRecord
    image: bytes


class CaptureTap:
    """Decides per served image, queues the kept ones, stores them on one thread."""

    def __init__(
        self,
        captures: Captures,
        default: CapturePolicy,
        *,
        queue_size: int,
        refresh_s: float,
        low_confidence_below: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.captures, self.default, self.refresh_s, self.clock = (
            captures,
            default,
            refresh_s,
            clock,
        )
        self._queue: queue.Queue[_Job | str] = queue.Queue(maxsize=max(1, queue_size))
        self._policies: dict[str, CapturePolicy] = {}
        self._read_at: dict[str, float] = {}
        self._samplers: dict[str, Sampler] = collections.defaultdict(Sampler)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        """(model, outcome) -> captures: ``stored``, ``dropped`` (queue full), ``failed``."""
        self.low_confidence_below = low_confidence_below
        self.confidence: collections.Counter[tuple[str, str]] = collections.Counter()
        """(model, ``low`` or ``ok``) -> images served (every one, captured or not)."""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def policy(self, model: str) -> CapturePolicy:
        """The policy in force for ``model`` (its stored one once read, else the default);
        schedules a re-read when the last one is older than ``refresh_s``."""
        due = time.monotonic() - self._read_at.get(model, -1e9) >= self.refresh_s
        if due:
            self._read_at[model] = time.monotonic()
            self._offer(model)  # the writer thread reads it; a full queue retries later
        return self._policies.get(model, self.default)

    def load_policy(self, model: str) -> None:
        """Read ``model``'s stored policy now (blocking: off the event loop, where the model
        itself is loaded), so that it applies from the model's first request. A store that
        fails leaves the default; the periodic re-read tries again."""
        try:
            stored = self.captures.policy(model)
        except Exception as exc:  # capture must never stop a model from loading
            log.warning("capture policy of %s not read: %s", model, exc)
            return
        self._policies[model] = stored if stored is not None else self.default
        self._read_at[model] = time.monotonic()

    def observe(
        self,
        model: str,
        version: str,
        prediction_id: str,
        images: list[bytes],
        predictions: list[list[dict[str, Any]]],
    ) -> None:
        """Count the images by confidence, and offer those this policy keeps (non-blocking:
        on the event loop)."""
        self.tally(model, predictions)
        policy = self.policy(model)
        if not policy.enabled:
            return
        now = self.clock()
        sampler = self._samplers[model]
        for index, (data, ranked) in enumerate(zip(images, predictions, strict=True)):
            reason = sampler.choose(policy, ranked, now)
            kind = image_kind(data) if reason else None
            if reason is None or kind is None:
                continue
            record = CaptureRecord(
                model=model,
                prediction_id=prediction_id,
                index=index,
                version=version,
                created_at=now,
                reason=reason,
                image=kind,
                image_bytes=len(data),
                predictions=[CapturedLabel(label=r["label"], score=r["score"]) for r in ranked],
            )
            if not self._offer(_Job(record, data)):
                self.counts[(model, "dropped")] += 1

    def tally(self, model: str, predictions: list[list[dict[str, Any]]]) -> None:
        """Count served images as low-confidence or not (the live low-confidence rate)."""
        for ranked in predictions:
            low = bool(ranked) and float(ranked[0]["score"]) < self.low_confidence_below
            self.confidence[(model, "low" if low else "ok")] += 1

    def _offer(self, job: _Job | str) -> bool:
        self._start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._drain, name="refit-capture", daemon=True
                    )
                    self._thread.start()

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if isinstance(job, str):  # a policy to (re)read
                    stored = self.captures.policy(job)
                    self._policies[job] = stored if stored is not None else self.default
                else:
                    self.captures.put(job.record, job.image)
                    self.counts[(job.record.model, "stored")] += 1
            except Exception as exc:  # the store failing must never stop the thread
                if not isinstance(job, str):
                    self.counts[(job.record.model, "failed")] += 1
                log.warning("capture: %s", exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is stored (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks
