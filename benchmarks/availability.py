"""What clients see when a part of the serving path fails under load, on this one machine:
the object store frozen for 30 s (SIGSTOP on the SeaweedFS process), and the Serve HTTP proxy
killed. Each fault runs under a closed-loop predict load of a loaded model plus probes
(``/healthz`` and OIP model metadata, which needs the store, every 0.5 s), beside a round
without a fault in the same session.

**Store frozen**: predictions of a loaded model and ``/healthz`` must keep answering; calls that
need the store must fail within the request-path bound with 503, not hang.

**Proxy killed**: one node has one proxy, so here every request fails until Serve's
controller replaces it; how long that takes is the controller's proxy health-check period
times its threshold of 3 failed checks, plus the new proxy's start. The proxy is killed by its
pid, found through this cluster's own actor, with:

* ``Ray default`` - ``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S`` unset (10 s);
* ``Refit`` - ``REFIT_SERVE__PROXY_HEALTH_CHECK_PERIOD_S`` (2 s), what ``refit up`` and the k8s
  manifests set.

On Kubernetes every overlay runs two serve workers, each with replicas and a proxy behind the
``refit-serve`` Service, so a killed proxy costs the requests that were on it and new
connections go to the other worker's (retrying clients see no outage).

    python benchmarks/availability.py [--seconds 50] [--fault-at 6] [--freeze 30]
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


def _probe(base: str, until: float, out: list[tuple[str, float, int, float]]) -> None:
    import requests

    while time.perf_counter() < until:
        for route in ("/healthz", "/v2/models/bench"):
            start = time.perf_counter()
            try:
                status = requests.get(base + route, timeout=25).status_code
            except requests.RequestException:
                status = 0
            out.append((route, start, status, time.perf_counter() - start))
        time.sleep(0.5)


def _ms(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def _round(
    label: str,
    period: float | None,
    embedded: Any,
    args: argparse.Namespace,
    fault: str | None,
) -> dict[str, Any]:
    import ray

    from service import deployments
    from service.settings import RefitSettings, ServeSettings
    from training.job_settings import RaySettings
    from training.ray_train import ensure_ray
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    # Serve's Python proxies are what this measures (the HAProxy ingress has none to kill);
    # no period: Ray's own default
    serve = ServeSettings(
        port=free_port(),
        classifier_cpus=1,
        ingress="proxy",
        proxy_health_check_period_s=period if period is not None else 10.0,
    )
    conn, weed = embedded.connection, embedded.process
    assert conn is not None
    assert weed is not None
    settings = RefitSettings(s3=conn.s3_settings(), serve=serve)
    ensure_ray(RaySettings(num_cpus=4))
    try:
        reg = Registry(ObjectStore(settings.s3))
        if reg.get_alias("bench", "production")[0] is None:
            _publish(reg)
        deployments.run(settings)
        url = f"http://127.0.0.1:{serve.port}/v1/models/bench/predict"
        jpegs, _ = digit_jpegs(16, offset=1000)
        run_load(url, jpegs, concurrency=2, seconds=3)  # load the model, warm up
        seen: list[tuple[float, int]] = []
        probes: list[tuple[str, float, int, float]] = []
        fault_at: list[float] = []
        fault_end: list[float] = []

        def inject() -> None:
            time.sleep(args.fault_at)
            if fault == "proxy":
                pid = _proxy_pid()
                fault_at.append(time.perf_counter())
                os.kill(pid, signal.SIGKILL)
                _log(f"{label}: killed the proxy (pid {pid})")
            elif fault == "store":
                fault_at.append(time.perf_counter())
                os.kill(weed.pid, signal.SIGSTOP)
                _log(f"{label}: froze the store for {args.freeze:g} s")
                time.sleep(args.freeze)
                os.kill(weed.pid, signal.SIGCONT)
                fault_end.append(time.perf_counter())

        if fault is not None:
            threading.Thread(target=inject, daemon=True).start()
        base_url = f"http://127.0.0.1:{serve.port}"
        threading.Thread(
            target=_probe,
            args=(base_url, time.perf_counter() + args.seconds, probes),
            daemon=True,
        ).start()
        res = run_load(
            url,
            jpegs,
            concurrency=args.concurrency,
            seconds=args.seconds,
            on_response=lambda _c, t, status, _p: seen.append((t, status)),
        )
        row: dict[str, Any] = {"setup": label, "fault": fault or "none", **res.summary()}
        row["proxy_health_check_period_s"] = period if period is not None else 10.0
        t0 = fault_at[0] if fault_at else args.fault_at + min(t for _, t, _, _ in probes)
        t1 = fault_end[0] if fault_end else float("inf")
        during = [p for p in probes if t0 <= p[1] <= t1]
        health = [lat for r, _, st, lat in during if r == "/healthz" and st == 200]
        meta = [(st, lat) for r, _, st, lat in during if r != "/healthz"]
        row["healthz_p99_ms"], row["healthz_max_ms"] = _ms(health, 99), _ms(health, 100)
        row["healthz_failed"] = sum(1 for r, _, st, _ in during if r == "/healthz" and st != 200)
        row["metadata_statuses"] = sorted({st for st, _ in meta})
        row["metadata_max_s"] = round(max((lat for _, lat in meta), default=0.0), 2)
        failed = [t for t, s in seen if s != 200 and t >= t0]
        row["predicts_failed_in_fault"] = len(failed)
        row["outage_s"] = row["recovered_s"] = None  # a column of every row in the table
        if fault == "proxy":
            last_fail = max(failed, default=t0)
            back = min((t for t, s in seen if s == 200 and t > last_fail), default=None)
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
    from training.preprocessing_spec import Preprocessing

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
    """Run the rounds; print the table; write results/availability.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=50.0, help="load per round")
    p.add_argument("--fault-at", type=float, default=6.0, help="seconds into the load")
    p.add_argument("--freeze", type=float, default=30.0, help="seconds the store is frozen")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()

    from service.embedded_store import EmbeddedStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        embedded = EmbeddedStore(Path(tmp))
        embedded.start()
        try:
            rows.append(_round("Refit, no fault (baseline)", 2.0, embedded, args, None))
            rows.append(_round("Refit, store frozen", 2.0, embedded, args, "store"))
            rows.append(_round("Ray default, proxy killed", None, embedded, args, "proxy"))
            rows.append(_round("Refit, proxy killed", 2.0, embedded, args, "proxy"))
        finally:
            embedded.stop()
    report(
        "availability",
        rows,
        {"nodes": 1, "proxies": 1, "fault_at_s": args.fault_at, "freeze_s": args.freeze},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
