"""head_only with the feature cache vs without it: seconds per epoch (same model, data, batch).

Without the cache every epoch runs the frozen backbone forward on every image; with it the
backbone runs once (reported separately) and epochs train the head on cached features.
Goal: >= 10x per epoch. Usage: python benchmarks/feature_cache.py [--backbone resnet18]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import digits_store, report

from training import demo
from training.backbones import build_backbone, head_module, trunk
from training.data import ByteCache, ImageDataset, index_dataset, make_loader
from training.freeze import apply_freeze, param_groups, plan_freeze
from training.freeze_spec import HeadOnly
from training.loop import (
    Precision,
    build_optimizer,
    build_scheduler,
    extract_features,
    train_one_epoch,
)
from training.preprocess import eval_transform


def main() -> None:
    """Measure and report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cpu = Precision(torch.device("cpu"))
    with digits_store() as (_, store):
        idx = index_dataset(store, store.uri(f"datasets/{demo.SOURCE}/"))
        ds = ImageDataset(
            store, idx.train, eval_transform(demo.PREPROCESSING), cache=ByteCache(1 << 30)
        )
        loader = make_loader(ds, batch_size=32, shuffle=True)
        list(loader)  # warm the byte cache: both variants then read from memory
        model = build_backbone(args.backbone, num_classes=len(idx.classes))
        plan = plan_freeze(HeadOnly(feature_cache=False), model, args.backbone)
        apply_freeze(model, plan)

        def epochs(net: torch.nn.Module, batches, n: int) -> float:
            opt = build_optimizer(
                param_groups(model, plan, weight_decay=0.0), name="adamw", lr=1e-3
            )
            sched = build_scheduler(opt, plan, steps_per_epoch=len(batches), epochs=n)
            start = time.perf_counter()
            for e in range(n):
                train_one_epoch(net, batches, opt, sched, plan=plan, epoch=e, precision=cpu)
                print(f"  epoch {e + 1}/{n} done", flush=True)
            return (time.perf_counter() - start) / n

        print("without cache ...", flush=True)
        no_cache = epochs(model, loader, args.epochs)
        print("with cache ...", flush=True)
        start = time.perf_counter()
        feats = extract_features(trunk(model, args.backbone), loader, precision=cpu)
        extract_s = time.perf_counter() - start
        feat_batches = list(zip(feats[0].split(32), feats[1].split(32), strict=True))
        cached = epochs(head_module(model, args.backbone), feat_batches, args.epochs * 10)
    rows = [
        {"variant": "head_only, no cache", "s_per_epoch": no_cache, "one_time_s": 0.0},
        {"variant": "head_only, feature cache", "s_per_epoch": cached, "one_time_s": extract_s},
    ]
    report(
        "feature_cache",
        rows,
        {
            "backbone": args.backbone,
            "images": len(idx.train),
            "speedup_per_epoch": no_cache / max(cached, 1e-9),
        },
    )


if __name__ == "__main__":
    main()
