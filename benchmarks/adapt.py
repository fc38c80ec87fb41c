"""Hot swap under load, and time to adapt, over HTTP on the embedded stack.

1. **Hot swap**: steady closed-loop load (``--concurrency``) on the demo base model while a new
   version is published and promoted through the API, ``--swaps`` times. Per swap: seconds from
   the promote call to the first response from the new version and to the last response from
   the old one, failed requests, versions going backwards, and batches split by version.
   Baseline in the same run: the same load with no swap (latency p50/p99 without swapping).
2. **Time to adapt**: from ``POST /v1/finetune-jobs`` (the demo's digits-5to9 fine-tune from
   the base) to the first predict response from the new version.

    python benchmarks/adapt.py [--swaps 5] [--concurrency 8] [--base-epochs 3]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from common import demo_base, report  # also puts the repository on sys.path
from load import digit_jpegs, free_port, reexec_with_jemalloc, run_load

ADMIN = "bench-admin"


def _scrape(url: str) -> tuple[float, str]:
    """Batches split by version so far, and the numeric mode(s) the loaded versions run."""
    scrape = {"Authorization": f"Bearer {ADMIN}"}  # /metrics takes the admin token too
    split, modes = 0.0, set()
    for line in requests.get(url + "/metrics", headers=scrape, timeout=30).text.splitlines():
        if line.startswith("refit_batches_split_by_version_total"):
            split = float(line.rsplit(" ", 1)[1])
        if line.startswith("refit_model_loaded_info{") and line.endswith(" 1.0"):
            modes.add(line.split('mode="')[1].split('"')[0])
    return split, ",".join(sorted(modes))


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def hot_swaps(url: str, reg: Any, model: str, images: list[bytes], args: Any) -> list[dict]:
    """Promote ``args.swaps`` new versions under load; one row per swap plus a no-swap row."""
    predict = f"{url}/v1/models/{model}/predict"
    base = run_load(predict, images, concurrency=args.concurrency, seconds=args.window)
    rows: list[dict[str, Any]] = [
        {
            "run": "no swap (baseline)",
            **base.summary(),
            **dict.fromkeys(
                ("first_new_s", "last_old_s", "backwards", "old_after_new", "split_batches"), None
            ),
            "served_mode": _scrape(url)[1],
            "ended_on_new": None,
        }
    ]
    manifest, state = reg.load(model, "production")
    calibration = reg.load_calibration(manifest)
    fields = manifest.model_dump(
        include={"backbone", "num_classes", "class_names", "preprocessing", "metrics", "graphs"}
    )
    # the same graphs (int8 and openvino) as the base, so every swap loads the fastest mode
    graphs = {
        name: reg.read_file(manifest, name)
        for record in manifest.graphs.values()
        for name in record.files
    }
    for i in range(args.swaps):
        new = reg.publish(state, model=model, calibration=calibration, extra_files=graphs, **fields)
        rows.append(
            {"run": f"swap {i + 1}", **_one_swap(url, reg, model, new.version, images, args)}
        )
        _log(str(rows[-1]))
    return rows


def _one_swap(
    url: str, reg: Any, model: str, new_version: str, images: list[bytes], args: Any
) -> dict[str, Any]:
    old_version = reg.get_alias(model, "production")[0].version
    seen: list[tuple[float, str]] = []
    per_client: dict[int, list[str]] = {}
    promote_at: list[float] = []

    def on_response(client: int, t: float, status: int, payload: dict[str, Any] | None) -> None:
        if payload is not None:
            seen.append((t, payload["model_version"]))
            per_client.setdefault(client, []).append(payload["model_version"])

    def promote() -> None:
        time.sleep(args.window / 3)
        promote_at.append(time.perf_counter())
        r = requests.post(
            f"{url}/v1/models/{model}/promote",
            json={"version": new_version},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        r.raise_for_status()

    split_before, _ = _scrape(url)
    thread = threading.Thread(target=promote)
    thread.start()
    res = run_load(
        f"{url}/v1/models/{model}/predict",
        images,
        concurrency=args.concurrency,
        seconds=args.window,
        on_response=on_response,
    )
    thread.join()
    split_after, mode_after = _scrape(url)
    t0 = promote_at[0]
    seen.sort()
    first_new = next((t for t, v in seen if v == new_version), None)
    last_old = max((t for t, v in seen if v == old_version), default=t0)
    return {
        **res.summary(),
        "first_new_s": (first_new - t0) if first_new else None,
        "last_old_s": max(0.0, last_old - t0),
        # versions never go backwards: no client gets the old version after the new one
        "backwards": sum(
            1
            for answers in per_client.values()
            for a, b in itertools.pairwise(answers)
            if a == new_version and b == old_version
        ),
        # stricter: no old answer completed after the first new one, by any client
        "old_after_new": sum(
            1 for t, v in seen if first_new and t > first_new and v == old_version
        ),
        "split_batches": split_after - split_before,
        "served_mode": mode_after,
        "ended_on_new": bool(seen) and seen[-1][1] == new_version,
    }


def time_to_adapt(url: str, store: Any, images: list[bytes]) -> dict[str, Any]:
    """POST the demo fine-tune; seconds until the job ends and until the new version answers."""
    from training import demo

    headers = {"Authorization": f"Bearer {ADMIN}"}
    start = time.perf_counter()
    r = requests.post(
        f"{url}/v1/finetune-jobs", json=demo.target_spec(store), headers=headers, timeout=60
    )
    r.raise_for_status()
    job_id = r.json()["job_id"]
    predict = f"{url}/v1/models/{demo.TARGET}/predict"
    import base64

    body = {"images": [base64.b64encode(images[0]).decode()]}
    job: dict[str, Any] = {}
    finished = None
    while True:
        job = requests.get(f"{url}/v1/finetune-jobs/{job_id}", headers=headers, timeout=30).json()
        if job["state"] in {"failed", "cancelled"}:
            raise RuntimeError(f"job {job['state']}: {job['reason']}")
        if job["state"] == "succeeded" and finished is None:
            finished = time.perf_counter() - start
            if not job["result"]["published"]:
                raise RuntimeError(f"not published: {job['reason']}")
        resp = requests.post(predict, json=body, timeout=30)
        if (
            resp.status_code == 200
            and finished is not None
            and resp.json()["model_version"] == job["result"]["version"]
        ):
            break
        time.sleep(0.1)
    answered = time.perf_counter() - start
    result = job["result"]
    _log(f"adapted in {answered:.1f} s (job {finished:.1f} s)")
    return {
        "job_seconds": finished,
        "post_to_new_version_s": answered,
        "job_internal_seconds": result["seconds"],
        "val_top1": result["metrics"]["top1"],
        "epochs": result["epochs_run"],
        "version": result["version"],
    }


def main() -> int:
    """Run both parts; print the table; write results/adapt.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--window", type=float, default=9.0, help="seconds of load per swap")
    p.add_argument("--base-epochs", type=int, default=3)
    p.add_argument("--no-jemalloc", action="store_true")
    p.add_argument("--mode", default="int8", help="numeric mode served (the fastest: int8)")
    args = p.parse_args()
    malloc = reexec_with_jemalloc(not args.no_jemalloc)

    import ray

    from service import deployments
    from service.embedded_store import EmbeddedStore
    from service.settings import RefitSettings, ServeSettings
    from training import demo
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            settings = RefitSettings(
                s3=conn.s3_settings(),
                serve=ServeSettings(
                    port=free_port(),
                    admin_token=ADMIN,
                    poll_interval_s=2.0,
                    numeric_mode=args.mode,
                ),
            )
            store = ObjectStore(settings.s3)
            reg = Registry(store)
            demo_base(settings, store, args.base_epochs)
            deployments.run(settings)
            url = f"http://127.0.0.1:{settings.serve.port}"
            images, _ = digit_jpegs(64, size=64)
            run_load(f"{url}/v1/models/{demo.BASE_MODEL}/predict", images, concurrency=2, seconds=2)
            rows = hot_swaps(url, reg, demo.BASE_MODEL, images, args)
            adapt = time_to_adapt(url, store, images)
            deployments.shutdown()
        finally:
            ray.shutdown()
    report(
        "adapt",
        rows,
        {
            "allocator": malloc,
            "concurrency": args.concurrency,
            "poll_interval_s": 2.0,
            "time_to_adapt": adapt,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
