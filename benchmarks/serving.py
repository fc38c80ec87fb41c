"""Serving throughput and latency at concurrency 1, 8 and 32, per numeric mode, against a
raw-torch forward of the same model and mode measured in the same run.

224 px JPEG requests (one image each, JSON base64) on resnet18; decoding and preprocessing
happen inside the service. The model: a random resnet18 trunk with a linear head trained on
its features of scikit-learn digits (so top-1 answers differ across images and the bf16
agreement check is meaningful; no pretrained weights can be downloaded here).

    python benchmarks/serving.py [--seconds 12] [--modes fp32,fp32_jit] [--no-jemalloc]
                                 [--no-torchserve]

TorchServe 0.12 (``benchmarks/torchserve/``: its own venv, Java from Debian) serves the same
weights as TorchScript with the same preprocessing, measured first with the same JPEGs and
client; ``vs_torchserve`` is each row's req/s over TorchServe's best configuration at the same
concurrency. ``top1_agreement`` checks 32 answers of each system against the local model.

``vs_raw`` compares with the raw forward in the same mode; ``vs_raw_fp32`` with raw fp32
eager, the yardstick the goals are stated against. A mode the service refused (agreement
below 99 % or slower than fp32 on this CPU) shows ``served_mode`` fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import report  # also puts the repository on sys.path
from load import digit_jpegs, free_port, reexec_with_jemalloc, run_load

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


SCRAPE_TOKEN = "bench-scrape"


def build_model(threads: int) -> tuple[Any, Any, Any, Any]:
    """resnet18 trunk (random) + linear head trained on digit features at 224 px. Returns
    the model, preprocessing, uint8 calibration crops and the held-out crops."""
    import torch

    from service.dataplane.images import decode_request_images
    from training.backbones import build_backbone, head_module, trunk
    from training.preprocess import Preprocessing, normalize

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    pre = Preprocessing(resize_size=256, crop_size=224, **IMAGENET)
    model = build_backbone("resnet18", num_classes=10).eval()
    jpegs, labels = digit_jpegs(600)
    crops = decode_request_images(
        jpegs, max_image_bytes=1 << 24, max_pixels=1 << 26, preprocessing=pre
    )
    x = normalize(pre, crops)
    body = trunk(model, "resnet18")
    with torch.inference_mode():
        feats = torch.cat([body(x[i : i + 50]).flatten(1) for i in range(0, 400, 50)])
    head = head_module(model, "resnet18")
    y = torch.tensor(labels[:400])
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):  # full-batch logistic regression on standardised features
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head((feats - mu) / sd), y)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the head
        w = head.weight / sd
        head.bias -= (w * mu).sum(1)
        head.weight.copy_(w)
    return model, pre, crops[400:432], crops[432:]


def _prepared(model: Any, mode: str, x: Any) -> Any:
    """A copy of ``model`` made ready for ``mode`` exactly as the service does it."""
    import copy

    from service.dataplane.served_model import prepare

    return prepare(copy.deepcopy(model), mode, x[:8])


def raw_forward(model: Any, x: Any, mode: str, seconds: float, batch: int = 16) -> float:
    """Images/s of a bare forward pass (no HTTP, no decode) in ``mode``."""
    import torch

    from service.dataplane.served_model import forward

    m = _prepared(model, mode, x)
    xb = x[:batch]
    with torch.inference_mode():
        forward(m, xb, mode)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(m, xb, mode)
            n += batch
    return n / (time.perf_counter() - start)


def agreement(model: Any, x: Any, mode: str) -> tuple[float, int]:
    """Top-1 agreement of ``mode`` with fp32 on held-out crops, and how many classes fp32
    predicts among them (a collapsed model would agree trivially)."""
    import torch

    from service.dataplane.served_model import forward

    with torch.inference_mode():
        ref = forward(model, x, "fp32").argmax(1)
        got = forward(_prepared(model, mode, x), x, mode).argmax(1)
    return float((got == ref).float().mean()), int(ref.unique().numel())


def _scrape(url: str) -> dict[str, float]:
    import requests

    out = {}
    scrape = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    for line in requests.get(url + "/metrics", headers=scrape, timeout=30).text.splitlines():
        if line.startswith(("refit_batch_size_sum", "refit_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        if line.startswith("refit_classifier_allocator_info{"):
            out["allocator:" + line.split('allocator="')[1].split('"')[0]] = 1.0
        if line.startswith("refit_model_loaded_info"):
            out["mode:" + line.split('mode="')[1].split('"')[0]] = 1.0
        if line.startswith("refit_model_mode_fallback{"):
            out["refused:" + line.split('reason="')[1].split('"')[0]] = 1.0
    return out


def main() -> int:
    """Run the benchmark; print the table; write results/serving.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    p.add_argument("--modes", default="fp32,channels_last,fp32_jit,bf16,bf16_jit")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--classifier-cpus", type=float, default=2.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--no-jemalloc", action="store_true")
    p.add_argument("--no-torchserve", action="store_true", help="skip the TorchServe peer")
    args = p.parse_args()
    malloc = reexec_with_jemalloc(not args.no_jemalloc)

    import ray
    import torch

    from service import deployments
    from service.embedded_store import EmbeddedStore
    from service.settings import RefitSettings, ServeSettings
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    threads = max(1, int(args.classifier_cpus))
    print(f"[bench] allocator {malloc}; building the model", file=sys.stderr, flush=True)
    model, pre, calibration, held_out = build_model(threads)
    from training.preprocess import normalize

    x_held = normalize(pre, held_out)
    raw = {}
    checks = {}
    for mode in dict.fromkeys(["fp32", *modes]):  # raw fp32 eager: the common yardstick
        raw[mode] = raw_forward(model, x_held, mode, seconds=6)
        checks[mode] = agreement(model, x_held, mode)
        print(f"[bench] raw {mode}: {raw[mode]:.1f} img/s", file=sys.stderr, flush=True)
    jpegs, _ = digit_jpegs(64, offset=1000)
    from service.dataplane.images import decode_request_images

    with torch.inference_mode():
        crops = decode_request_images(
            jpegs, max_image_bytes=1 << 24, max_pixels=1 << 26, preprocessing=pre
        )
        expected = [str(int(i)) for i in model(normalize(pre, crops)).argmax(1)]
    peer: list[dict[str, Any]] = []
    if not args.no_torchserve:
        from torchserve_peer import torchserve_rows

        peer = torchserve_rows(model, jpegs, expected, levels, args.seconds)
    best_peer = {
        c: max((r["req_per_s"] for r in peer if r["concurrency"] == c), default=0.0) for c in levels
    }

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            base = RefitSettings(s3=conn.s3_settings())
            reg = Registry(ObjectStore(base.s3))
            manifest = reg.publish(
                model.state_dict(),
                model="bench",
                calibration=calibration,
                backbone="resnet18",
                num_classes=10,
                class_names=[str(i) for i in range(10)],
                preprocessing=pre,
            )
            reg.set_alias("bench", "production", manifest.version)
            for mode in modes:
                settings = base.model_copy(
                    update={
                        "serve": ServeSettings(
                            port=free_port(),
                            numeric_mode=mode,
                            metrics_token=SCRAPE_TOKEN,
                            classifier_cpus=args.classifier_cpus,
                            max_batch_size=args.max_batch_size,
                            max_ongoing_requests=128,
                        )
                    }
                )
                deployments.run(settings)
                url = f"http://127.0.0.1:{settings.serve.port}"
                predict = f"{url}/v1/models/bench/predict"
                run_load(predict, jpegs, concurrency=4, seconds=3)  # load the model, warm up
                from torchserve_peer import top1_agreement

                agreement_http = top1_agreement(predict, jpegs[:32], expected[:32])
                state = _scrape(url)
                served_mode = next((k[5:] for k in state if k.startswith("mode:")), "unknown")
                refused = next((k[8:] for k in state if k.startswith("refused:")), "")
                replica_malloc = next((k[10:] for k in state if k.startswith("allocator:")), "?")
                for c in levels:
                    before = _scrape(url)
                    res = run_load(predict, jpegs, concurrency=c, seconds=args.seconds)
                    after = _scrape(url)
                    batches = after["refit_batch_size_count"] - before["refit_batch_size_count"]
                    reqs = after["refit_batch_size_sum"] - before["refit_batch_size_sum"]
                    s = res.summary()
                    rows.append(
                        {
                            "mode": mode,
                            "served_mode": served_mode,
                            "replica_allocator": replica_malloc,
                            "refused_for": refused,
                            "concurrency": c,
                            **s,
                            "mean_batch": reqs / max(1.0, batches),
                            "raw_img_per_s": raw[mode],
                            "vs_raw": s["req_per_s"] / raw[mode],
                            "vs_raw_fp32": s["req_per_s"] / raw["fp32"],
                            "vs_torchserve": s["req_per_s"] / best_peer[c]
                            if best_peer[c]
                            else None,
                            "top1_agreement": agreement_http,
                        }
                    )
                    print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
                deployments.shutdown()
        finally:
            ray.shutdown()
    for r in peer:  # the peer's rows beside ours, in the same table
        best = best_peer[r["concurrency"]]
        rows.append(
            {
                "mode": r["system"],
                "served_mode": "torchscript fp32",
                "refused_for": "",
                "replica_allocator": "glibc (TorchServe default)",
                "concurrency": r["concurrency"],
                **{k: r[k] for k in ("requests", "req_per_s", "p50_ms", "p99_ms", "errors")},
                "mean_batch": None,
                "raw_img_per_s": raw["fp32"],
                "vs_raw": r["req_per_s"] / raw["fp32"],
                "vs_raw_fp32": r["req_per_s"] / raw["fp32"],
                "vs_torchserve": r["req_per_s"] / best if best else None,
                "top1_agreement": r["top1_agreement"],
            }
        )
    report(
        "serving",
        rows,
        {
            "allocator": malloc,  # of this process and the Ray processes it started
            "torch_threads": threads,
            "agreement_with_fp32": {m: checks[m][0] for m in modes},
            "fp32_classes_predicted": {m: checks[m][1] for m in modes},
            "held_out_images": int(held_out.shape[0]),
            "torch": torch.__version__,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
