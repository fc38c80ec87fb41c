"""Fine-tuned from the pretrained base vs from scratch: top-1 on the target's test split.

The base is resnet18 trained on digits 0-4 (all labels); the target is digits 5-9 with 20
labels per class. Every policy runs twice with the same budget (epochs, batch, lr, seed): from
the base and from random weights. The test split is never seen by training or selection.
Usage: python benchmarks/transfer.py [--epochs 8] [--base-epochs 6]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import digits_store, report, run_local

from training import demo
from training.backbones import build_backbone
from training.data import Sample, index_dataset
from training.run_context import RunInputs
from training.scoring import evaluate_model
from training.spec import parse_spec

POLICIES: list[dict[str, Any]] = [
    {"policy": "full"},
    {"policy": "head_only"},
    {"policy": "last_n_stages", "n": 2},
    {"policy": "lp_ft", "probe_epochs": 3, "ft_lr_factor": 0.2},
    {"policy": "gradual_unfreeze", "every": 2},
    {"policy": "layer_decay", "decay": 0.5},
    {"policy": "patterns", "trainable": [r"^layer4\.", r"^fc\."]},
]


def main() -> None:
    """Measure and report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--base-epochs", type=int, default=6)
    args = ap.parse_args()
    rows = []
    with digits_store() as (settings, store):
        src = parse_spec(demo.base_spec(store, epochs=args.base_epochs))
        src_idx = index_dataset(store, src.dataset)
        print(f"training the base on digits 0-4 ({args.base_epochs} epochs) ...", flush=True)
        _, base_state = run_local(
            RunInputs(
                spec=src,
                s3=settings.s3,
                training=settings.training,
                backbone="resnet18",
                classes=src_idx.classes,
                train=src_idx.train,
                val=src_idx.val,
                preprocessing=demo.PREPROCESSING,
            )
        )
        tgt_uri = store.uri(f"datasets/{demo.TARGET}/")
        idx = index_dataset(store, tgt_uri)
        ids = {c: i for i, c in enumerate(idx.classes)}
        test = [
            Sample(o.key, ids[o.key.split("/")[-2]])
            for o in store.list(f"datasets/{demo.TARGET}/test/")
        ]
        for policy in POLICIES:
            spec = parse_spec(
                {
                    **demo.target_spec(store, policy=policy, epochs=args.epochs),
                    "base": {"backbone": "resnet18"},
                    "workers": 1,
                }
            )
            row: dict[str, Any] = {"policy": policy["policy"]}
            for label, state in (("from_base", base_state), ("from_scratch", None)):
                start = time.perf_counter()
                _, best = run_local(
                    RunInputs(
                        spec=spec,
                        s3=settings.s3,
                        training=settings.training,
                        backbone="resnet18",
                        classes=idx.classes,
                        train=idx.train,
                        val=idx.val,
                        preprocessing=demo.PREPROCESSING,
                        base_state=state,
                    )
                )
                model = build_backbone("resnet18", num_classes=len(idx.classes))
                model.load_state_dict(best)
                metrics = evaluate_model(
                    model,
                    test,
                    store=store,
                    preprocessing=demo.PREPROCESSING,
                    classes=idx.classes,
                    training=settings.training,
                )
                row[f"{label}_top1"] = metrics["top1"]
                row[f"{label}_s"] = time.perf_counter() - start
                print(
                    f"  {policy['policy']:<17} {label:<12} test top1 {metrics['top1']:.3f}",
                    flush=True,
                )
            row["gain"] = row["from_base_top1"] - row["from_scratch_top1"]
            rows.append(row)
    report(
        "transfer",
        rows,
        {
            "test_images": len(test),
            "train_images": len(idx.train),
            "epochs": args.epochs,
            "base_epochs": args.base_epochs,
        },
    )


if __name__ == "__main__":
    main()
