"""What a client sees when the Serve HTTP proxy dies under load, on this one machine.

One node has one proxy, so here every request fails until Serve's controller replaces it; how
long that takes is the controller's proxy health-check period times its threshold of 3 failed
checks, plus the new proxy's start. The benchmark kills the proxy (by its pid, found through
this cluster's own actor) under a closed-loop load and measures, beside a run without a kill
in the same session:

* ``Ray default`` - ``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S`` unset (10 s);
* ``Refit`` - ``REFIT_SERVE__PROXY_HEALTH_CHECK_PERIOD_S`` (2 s), what ``refit up`` and the k8s
  manifests set.

On Kubernetes every overlay runs two serve workers, each with replicas and a proxy behind the
``refit-serve`` Service, so a killed proxy costs the requests that were on it and new
connections go to the other worker's (retrying clients see no outage).

    python benchmarks/proxy_failover.py [--seconds 30] [--kill-at 6] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import report  # also puts the repository on sys.path
from load import digit_jpegs, free_port, run_load


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _proxy_pid() -> int:
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_PROXY_ACTOR")
    ]
    assert len(names) == 1, names  # one node here: one proxy
    proxy = ray.get_actor(names[0], namespace="serve")
    return int(ray.get(proxy.__ray_call__.remote(lambda _self: os.getpid())))


def _round(
    label: str, period: float | None, conn: Any, args: argparse.Namespace, kill: bool
) -> dict[str, Any]:
    import ray

    from service import deployments
    from service.settings import RefitSettings, ServeSettings
    from training.job_settings import RaySettings
    from training.ray_train import ensure_ray
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    serve = ServeSettings(port=free_port(), classifier_cpus=1)
    if period is not None:
        serve = serve.model_copy(update={"proxy_health_check_period_s": period})
    settings = RefitSettings(s3=conn.s3_settings(), serve=serve)
    env = deployments.controller_env(settings) if period is not None else None
    ensure_ray(RaySettings(num_cpus=4), env=env)
    try:
        reg = Registry(ObjectStore(settings.s3))
        if reg.get_alias("bench", "production")[0] is None:
            _publish(reg)
        deployments.run(settings)
        url = f"http://127.0.0.1:{serve.port}/v1/models/bench/predict"
        jpegs, _ = digit_jpegs(16, offset=2000)
        run_load(url, jpegs, concurrency=2, seconds=3)  # load the model, warm up
        seen: list[tuple[float, int]] = []
        killed_at: list[float] = []

        def killer() -> None:
            time.sleep(args.kill_at)
            pid = _proxy_pid()
            killed_at.append(time.perf_counter())
            os.kill(pid, signal.SIGKILL)
            _log(f"{label}: killed the proxy (pid {pid})")

        if kill:
            threading.Thread(target=killer, daemon=True).start()
        res = run_load(
            url,
            jpegs,
            concurrency=args.concurrency,
            seconds=args.seconds,
            on_response=lambda _c, t, status, _p: seen.append((t, status)),
        )
        row: dict[str, Any] = {"setup": label, "proxy_killed": kill, **res.summary()}
        row["health_check_period_s"] = period if period is not None else 10.0
        if kill and killed_at:
            t0 = killed_at[0]
            failed = [t for t, s in seen if s != 200 and t >= t0]
            last_fail = max(failed, default=t0)
            back = min((t for t, s in seen if s == 200 and t > last_fail), default=None)
            row["failed_after_kill"] = len(failed)
            row["outage_s"] = round(last_fail - t0, 2)
            row["recovered_s"] = round(back - t0, 2) if back is not None else None
        _log(f"{row}")
        deployments.shutdown()
        return row
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)  # the next round starts its own cluster


def _publish(reg: Any) -> None:
    import torch

    from training.backbones import build_backbone
    from training.preprocess import Preprocessing

    torch.manual_seed(0)
    model = build_backbone("resnet18", num_classes=10)
    manifest = reg.publish(
        model.state_dict(),
        model="bench",
        calibration=torch.randint(0, 255, (8, 3, 224, 224), dtype=torch.uint8),
        backbone="resnet18",
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        preprocessing=Preprocessing(),
    )
    reg.set_alias("bench", "production", manifest.version)


def main() -> int:
    """Run the rounds; print the table; write results/proxy_failover.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=50.0, help="load per round")
    p.add_argument("--kill-at", type=float, default=6.0, help="seconds into the load")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()

    from service.embedded_store import EmbeddedStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        rows.append(_round("Refit (baseline, no kill)", 2.0, conn, args, kill=False))
        rows.append(_round("Ray default", None, conn, args, kill=True))
        rows.append(_round("Refit", 2.0, conn, args, kill=True))
    report("proxy_failover", rows, {"nodes": 1, "proxies": 1, "kill_at_s": args.kill_at})
    return 0


if __name__ == "__main__":
    sys.exit(main())
