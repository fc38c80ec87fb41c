"""A job's progress records on the store, written the same way by both training paths (Ray
Train's controller, or the job's own process): each epoch with the training curve so far
(:class:`EpochProgress`), and rank 0's steps within an epoch (:class:`StepProgress`). Both are
best effort: a store hiccup is logged, never fails training."""

from __future__ import annotations

import logging
import time
from typing import Any

from training.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

CURVE_KEYS = ("train_loss", "val_loss", "val_top1", "images_per_s", "epoch_s")


class EpochProgress:
    """Logs each epoch's report and stores it with the history of all epochs."""

    def __init__(self, store: ObjectStore, key: str, *, echo: bool = True) -> None:
        self.store, self.key, self.echo = store, key, echo
        self.history: dict[int, dict[str, float]] = {}

    def record(self, metrics: dict[str, Any]) -> None:
        """Store one report (an epoch's metrics, or rank 0's return at the end)."""
        m = dict(metrics)
        if "epoch" in m:
            # keyed by epoch: an epoch repeated after a resume replaces the lost attempt
            self.history[int(m["epoch"])] = {k: float(m[k]) for k in CURVE_KEYS if k in m}
            m["history"] = [{"epoch": e, **h} for e, h in sorted(self.history.items())]
        if "epoch" in m and self.echo:
            print(
                f"[refit] epoch {m['epoch']}/{m['epochs']} loss {m['train_loss']:.4f} "
                f"val top1 {m['val_top1']:.4f} {m['images_per_s']:.1f} img/s "
                f"eta {m['eta_s']:.0f}s",
                flush=True,
            )
        try:
            self.store.put_json(self.key, m)
        except Exception as exc:  # progress is best effort; never fail training for it
            log.warning("could not store progress: %s", exc)


class StepProgress:
    """Rank 0's progress within an epoch, written at most every ``interval`` seconds."""

    def __init__(self, store: ObjectStore, key: str, interval: float) -> None:
        self.store, self.key, self.interval = store, key, interval
        self.last = 0.0

    def __call__(self, step: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        try:
            self.store.put_json(self.key, {**step, "time": time.time()})
        except Exception as exc:  # progress is best effort; never fail training for it
            log.warning("could not store step progress: %s", exc)


__all__ = ["EpochProgress", "StepProgress"]
