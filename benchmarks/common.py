"""Shared helpers of the benchmark scripts: an embedded store with the digits, table, JSON."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.embedded_store import EmbeddedStore
from service.settings import RefitSettings
from training import demo
from training.storage.s3 import ObjectStore

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def digits_store() -> Iterator[tuple[RefitSettings, ObjectStore]]:
    """A temporary SeaweedFS holding both demo datasets."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        settings = RefitSettings(s3=conn.s3_settings())
        store = ObjectStore(settings.s3)
        demo.write_demo_datasets(store)
        yield settings, store


def demo_base(settings: RefitSettings, store: ObjectStore, epochs: int) -> None:
    """Write both demo datasets and train the demo base model (a benchmark's set-up, not
    timed): the model that the measured fine-tunes and requests start from."""
    from training.finetune import run_finetune
    from training.spec import parse_spec

    demo.write_demo_datasets(store)
    print("[bench] training the demo base (setup, not timed)", flush=True)
    run_finetune(
        parse_spec(demo.base_spec(store, epochs=epochs), settings.training),
        s3=settings.s3,
        training=settings.training,
    )


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Print rows as a table and write them (with ``extra``) to results/NAME.json."""
    cols = list(dict.fromkeys(c for r in rows for c in r))  # rows of a peer may differ
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)))
    for k, v in extra.items():
        print(f"{k}: {_fmt(v)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, **extra}, indent=2))
    print(f"wrote {path}")
    return path


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def run_local(inputs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run :func:`training.worker.run_worker` in this process without Ray (world size 1).

    Returns every epoch's metrics and the weights of the best epoch (by val top-1).
    """
    import torch

    from training.checkpoints import load_best_weights
    from training.run_context import RunContext
    from training.worker import run_worker

    epochs: list[dict[str, Any]] = []
    best: dict[str, Any] = {"state": None}

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        epochs.append(metrics)
        if checkpoint is not None:  # each carries the best epoch's weights; the last wins
            best["state"] = load_best_weights(checkpoint)
            shutil.rmtree(checkpoint)

    run_worker(
        inputs,
        RunContext(
            rank=0, world_size=1, device=torch.device("cpu"), wrap_model=lambda m: m, report=report
        ),
    )
    return epochs, best["state"]
