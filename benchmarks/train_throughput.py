"""Ray Train path vs a plain torch loop: images/s on the same model, batch, data and threads.

Both run :func:`training.worker.run_worker` (same data path, same loop); the plain path calls it in
this process, the Ray path through ``training.ray_train.fit`` (TorchTrainer, one worker with the
same CPU count, checkpoints to S3 every epoch). Steady state = the last epoch (the first one
also fills the byte cache). Also reports peak RSS per worker.
Goal: ratio >= 0.9. Usage: python benchmarks/train_throughput.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import digits_store, report, run_local

from training import demo
from training.data import index_dataset
from training.job_settings import RaySettings, TrainingSettings
from training.run_context import RunInputs
from training.spec import parse_spec


def main() -> None:
    """Measure and report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with digits_store() as (settings, store):
        settings = settings.model_copy(
            update={"training": TrainingSettings(cpus_per_worker=threads)}
        )
        spec = parse_spec(
            {
                **demo.base_spec(store, epochs=args.epochs),
                "base": {"backbone": args.backbone},
                "batch_size": args.batch_size,
                "workers": 1,
            }
        )
        idx = index_dataset(store, spec.dataset)
        inputs = RunInputs(
            spec=spec,
            s3=settings.s3,
            training=settings.training,
            backbone=args.backbone,
            classes=idx.classes,
            train=idx.train,
            val=idx.val,
            preprocessing=demo.PREPROCESSING,
        )
        print(f"plain torch, {args.epochs} epochs ...", flush=True)
        start = time.perf_counter()
        plain, _ = run_local(inputs)
        plain_wall = time.perf_counter() - start

        from training.ray_train import ensure_ray, fit

        ensure_ray(RaySettings(num_cpus=threads))
        print(f"Ray Train, {args.epochs} epochs ...", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            ray_result = fit(inputs, job_id="bench-throughput", workdir=Path(work))
        ray_wall = time.perf_counter() - start
    p, r = plain[-1], ray_result.metrics
    rows = [
        {
            "path": "plain torch",
            "images_per_s": p["images_per_s"],
            "wall_s": plain_wall,
            "peak_rss_mb": p["peak_rss_mb"],
        },
        {
            "path": "Ray Train (1 worker)",
            "images_per_s": r["images_per_s"],
            "wall_s": ray_wall,
            "peak_rss_mb": r["peak_rss_mb"],
        },
    ]
    report(
        "train_throughput",
        rows,
        {
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "threads": threads,
            "images_per_epoch": len(idx.train),
            "epochs": args.epochs,
            "ratio_ray_over_plain": r["images_per_s"] / p["images_per_s"],
        },
    )


if __name__ == "__main__":
    main()
