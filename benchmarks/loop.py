"""The adaptation loop on the offline demo, over HTTP on the embedded stack.

``digits-base`` serves digits 0-4; then the input distribution shifts (the same digits,
inverted: dark strokes on light paper). A client keeps predicting, a labelling client sends
the true label back for a share of the captured predictions, the retrain policy
(``every_n_labels``) fires in the job runner, the job fine-tunes from the serving version on
the base dataset plus the feedback, the gate passes it, and the new version goes live.

Reported, all from this one run:

* latency at concurrency 1 with capture off, at rate 1.0 (every prediction stored: the worst
  case) and at rate 0.1, alternated twice, all with drift sampling off (the loop after runs on
  a deployment that samples it); the capture figures are the baseline's plus what capture
  adds;
* the input drift score of the serving version (``GET .../quality``): on unshifted digits,
  on the shift before the retrain, and of the new version on the same shifted traffic;
* accuracy of the served model on held-out shifted (and unshifted) digits before and after,
  and the live accuracy from labels per version (``GET /v1/models/{model}/quality``);
* labels needed (sent until the policy's job existed, as measured: the client labels on until
  it sees the job), and the time from the triggering label to the new version answering, split
  into detection, queueing, the job itself and the hot load, beside the job's own duration;
  the loop's own cost is everything but the job (goal <= 2 s);
* the fast path, the same way: a head-only model on the adapted trunk, fitted once on the
  demo's 901 labelled digits (their trunk features computed and stored), then its
  ``head_only`` policy fires on ``--head-labels`` labels and retrains on the stored features
  plus the new labels' own (goal: label -> new version answering <= 5 s);
* the job's fixed cost (its time beyond its epochs' train + validation) over its epochs' time,
  with the phases it went to;
* failed requests during the whole loop (background load at concurrency 2).

    python benchmarks/loop.py [--labels 100] [--label-fraction 0.5] [--epochs 3] [--lr 0.0005]
                              [--head-labels 10] [--head-epochs 20] [--no-head-only]
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from common import demo_base, report  # also puts the repository on sys.path
from load import free_port, reexec_with_jemalloc, run_load

ADMIN, LABEL = "bench-admin", "bench-label"
MODEL = "digits-base"
HEAD = "digits-head"
"""The head-only loop's model: a head fitted on the adapted trunk of ``MODEL``."""


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def digits(invert: bool) -> tuple[list[bytes], list[str]]:
    """Every scan of digits 0-4 as a 32 px PNG (inverted: the shifted rendering)."""
    from sklearn.datasets import load_digits

    from training.demo import digit_png

    d = load_digits()
    keep = [i for i, t in enumerate(d.target) if t < 5]
    return [digit_png(d.images[i], 32, invert=invert) for i in keep], [
        str(d.target[i]) for i in keep
    ]


def accuracy(url: str, images: list[bytes], labels: list[str]) -> tuple[float, str]:
    """Top-1 accuracy of what serves now (batches of 16), and the version(s) that answered."""
    right, versions = 0, set()
    for i in range(0, len(images), 16):
        body = {"images": [_b64(x) for x in images[i : i + 16]], "top_k": 1}
        r = requests.post(f"{url}/v1/models/{MODEL}/predict", json=body, timeout=60)
        r.raise_for_status()
        out = r.json()
        versions.add(out["model_version"])
        answers = zip(out["predictions"], labels[i : i + 16], strict=True)
        right += sum(p[0]["label"] == y for p, y in answers)
    return right / len(images), ",".join(sorted(versions))


class Background:
    """Closed-loop predictions from ``clients`` threads until stopped: every status, and the
    first time each version answered."""

    def __init__(self, url: str, images: list[bytes], clients: int = 2, model: str = MODEL) -> None:
        self.url, self.images = f"{url}/v1/models/{model}/predict", images
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.first_seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _run(self, n: int) -> None:
        session = requests.Session()
        i = n
        while not self.stop.is_set():
            body = {"images": [_b64(self.images[i % len(self.images)])], "top_k": 1}
            i += 7
            try:
                r = session.post(self.url, json=body, timeout=30)
                status = r.status_code
                version = r.json().get("model_version") if status == 200 else None
            except requests.RequestException:
                status, version = -1, None
            with self.lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if version is not None and version not in self.first_seen:
                    self.first_seen[version] = time.time()


def _label(url: str, prediction_id: str, label: str, model: str = MODEL) -> None:
    headers = {"Authorization": f"Bearer {LABEL}"}
    body = {"prediction_id": prediction_id, "index": 0, "label": label}
    deadline = time.monotonic() + 30
    while True:  # the capture is stored off the request path: it may land a moment later
        r = requests.post(
            f"{url}/v1/models/{model}/feedback", json=body, headers=headers, timeout=30
        )
        if r.status_code != 404 or time.monotonic() > deadline:
            r.raise_for_status()
            return
        time.sleep(0.05)


def labelling_client(
    url: str,
    images: list[bytes],
    labels: list[str],
    *,
    wanted: int,
    fraction: float,
    model: str = MODEL,
) -> tuple[int, int, float]:
    """Predict shifted digits and label ``fraction`` of them until ``wanted`` labels were
    sent; returns (predictions, labels, time the last label was taken)."""
    rng = random.Random(7)  # which predictions a person labels: reproducible
    sent = 0
    order = list(range(len(images)))
    rng.shuffle(order)
    for predicted, i in enumerate(order, start=1):
        body = {"images": [_b64(images[i])], "top_k": 1}
        r = requests.post(f"{url}/v1/models/{model}/predict", json=body, timeout=30)
        r.raise_for_status()
        if rng.random() < fraction:
            _label(url, r.json()["prediction_id"], labels[i], model)
            sent += 1
            if sent == wanted:
                return predicted, sent, time.time()
    raise RuntimeError(f"ran out of images after {sent} labels")


def label_until_fired(
    url: str,
    images: list[bytes],
    labels: list[str],
    *,
    fraction: float,
    model: str = MODEL,
    timeout: float = 300,
) -> tuple[int, int, float, dict[str, Any]]:
    """Predict and label ``fraction`` of the answers, looking for the policy's job after
    every label, until it exists: returns the predictions made and the labels sent before
    the job was created (the labels the policy needed, as measured), the time the last of
    them was taken, and the job."""
    rng = random.Random(7)  # which predictions a person labels: reproducible
    order = list(range(len(images)))
    rng.shuffle(order)
    sent: list[tuple[float, int]] = []  # when each label was taken, after how many predictions
    deadline = time.monotonic() + timeout
    for predicted, i in enumerate(order * 3, start=1):
        if time.monotonic() > deadline:
            break
        body = {"images": [_b64(images[i])], "top_k": 1}
        r = requests.post(f"{url}/v1/models/{model}/predict", json=body, timeout=30)
        r.raise_for_status()
        if rng.random() >= fraction:
            continue
        _label(url, r.json()["prediction_id"], labels[i], model)
        sent.append((time.time(), predicted))
        jobs = _admin("GET", f"{url}/v1/finetune-jobs?limit=5")["jobs"]
        fired = [j for j in jobs if j.get("trigger") and j["model"] == model]
        if fired:
            created = _ts(fired[0]["created_at"])
            before = [s for s in sent if s[0] <= created] or sent[:1]
            return before[-1][1], len(before), before[-1][0], dict(fired[0])
    raise RuntimeError(f"the policy did not fire after {len(sent)} labels")


def _admin(method: str, url: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    r = requests.request(method, url, headers=headers, timeout=60, **kw)
    r.raise_for_status()
    return r.json()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


CAPTURE_RATES = (0.0, 0.1, 1.0)
"""Off (the baseline), every prediction stored (the worst case), a tenth (a typical policy)."""


def _capture_run(rate: float) -> str:
    return "latency c=1, capture off" if rate == 0 else f"latency c=1, capture rate {rate:g}"


def latency(url: str, images: list[bytes], window: float) -> list[dict[str, Any]]:
    """Capture off / 1.0 / 0.1, twice, at concurrency 1: p50 and p99 of each window."""
    rows = []
    for rate in CAPTURE_RATES * 2:
        policy = {"rate": rate, "max_per_hour": 1_000_000, "max_per_class_per_hour": None}
        _admin("PUT", f"{url}/v1/models/{MODEL}/capture", json=policy)
        time.sleep(2.5)  # replicas re-read the policy every REFIT_CAPTURE__REFRESH_S (1 s)
        result = run_load(f"{url}/v1/models/{MODEL}/predict", images, concurrency=1, seconds=window)
        rows.append({"run": _capture_run(rate), **result.summary()})
        _log(str(rows[-1]))
    return rows


def drift(url: str) -> dict[str, Any] | None:
    """The serving version's drift score over the replicas' windows (quality JSON)."""
    d = _admin("GET", f"{url}/v1/models/{MODEL}/quality")["drift"]
    return None if d is None else {k: d[k] for k in ("version", "score", "samples", "outliers")}


def loop_row(
    name: str,
    job: dict[str, Any],
    t_trigger: float,
    t_live: float,
    counts: tuple[int, int],
    statuses: dict[int, int],
) -> dict[str, Any]:
    """The time from the label that fired a policy to its new version answering, split into
    detection, queue, the job and the hot load; the loop's own cost is all but the job."""
    created, started, finished = (_ts(job[k]) for k in ("created_at", "started_at", "finished_at"))
    # the job's part up to its version going live: graphs it makes after (numeric mode auto)
    # come later, beside the serving version
    graphs_after = float((job.get("result") or {}).get("phases", {}).get("graphs_after_s", 0.0))
    finished -= graphs_after
    job_s, total = finished - started, t_live - t_trigger
    return {
        "run": name,
        "labels": counts[1],
        "predictions": counts[0],
        "detect_s": round(created - t_trigger, 2),
        "queue_s": round(started - created, 2),
        "job_s": round(job_s, 2),
        "hot_load_s": round(t_live - finished, 2),
        "total_s": round(total, 2),
        "loop_overhead_s": round(total - job_s, 2),
        "failed_requests": sum(n for s, n in statuses.items() if s != 200),
        "graphs_after_live_s": round(graphs_after, 2),
    }


def _first_answer(load: Background, version: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout  # announced: a replica loads it in seconds
    while version not in load.first_seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{version} never answered within {timeout:.0f} s of its job")
        time.sleep(0.05)
    return load.first_seen[version]


def _policy_seen(url: str, model: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout  # the runner looks every policy_check_s (2 s)
    while _admin("GET", f"{url}/v1/models/{model}/retrain-policy")["state"] is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job runner never evaluated the policy ({timeout:.0f} s)")
        time.sleep(0.2)  # labels count from the runner's first look at the policy


def head_only_loop(
    url: str, store: Any, images: list[bytes], labels: list[str], args: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fast path end to end: a head-only model on the adapted trunk, fitted once on the
    demo's labelled digits (their trunk features are computed and stored), then a policy
    (``head_only``, every ``--head-labels`` labels) fires on labels of shifted traffic and
    retrains on the stored features plus the new labels' own. Returns the loop row (label
    that fires -> new version answering) and the jobs' figures."""
    from training import demo

    head_only = {"policy": "head_only", "feature_cache": True}
    spec = {
        "model": HEAD,
        "base": {"version": f"{MODEL}@production"},
        "dataset": store.uri(f"datasets/{demo.SOURCE}/"),
        "freeze": head_only,
        "epochs": args.head_epochs,
        "lr": args.head_lr,
        "batch_size": 32,
        "promote": True,
    }
    first = _admin("POST", f"{url}/v1/finetune-jobs", json=spec)
    _log(f"head-only model: job {first['job_id']} (features computed)")
    first = _wait_until_ended(url, first["job_id"])
    if not first["result"]["published"]:
        raise RuntimeError(f"head-only model not published: {first['reason']}")
    capture = {"rate": 1.0, "max_per_hour": 1_000_000, "max_per_class_per_hour": None}
    _admin("PUT", f"{url}/v1/models/{HEAD}/capture", json=capture)
    policy = {
        "every_n_labels": args.head_labels,
        "freeze": head_only,
        "cooldown_s": 3600,
        "epochs": args.head_epochs,
        "lr": args.head_lr,
        "batch_size": 32,
    }
    _admin("PUT", f"{url}/v1/models/{HEAD}/retrain-policy", json=policy)
    _policy_seen(url, HEAD)
    time.sleep(2.5)  # the replicas apply the capture policy (REFIT_CAPTURE__REFRESH_S)
    with Background(url, images, model=HEAD) as load:
        predicted, labelled, t_trigger, job = label_until_fired(
            url, images, labels, fraction=1.0, model=HEAD
        )
        job = _wait_until_ended(url, job["job_id"])
        if not job["result"]["published"]:
            raise RuntimeError(f"head-only retrain not published: {job['reason']}")
        t_live = _first_answer(load, job["result"]["version"])
    row = loop_row(
        "head-only loop: trigger label -> new version",
        job,
        t_trigger,
        t_live,
        (predicted, labelled),
        dict(load.statuses),
    )
    first_s = _ts(first["finished_at"]) - _ts(first["started_at"])
    extra = {
        "head_only_first_fit": {
            "job_s": round(first_s, 2),
            "phases_s": first["result"]["phases"],
            "images": job["trigger"]["dataset"]["images"]["base"],
        },
        "head_only_retrain": {
            "phases_s": job["result"]["phases"],
            "phase_details_s": job["result"].get("phase_details"),
            "scored_on": job["result"].get("scored_on"),
            "images": job["trigger"]["dataset"]["images"],
        },
    }
    return row, extra


def main() -> int:
    """Run the loop; print the table; write results/loop.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--labels", type=int, default=100, help="the policy's every_n_labels")
    p.add_argument("--label-fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the policy's job")
    p.add_argument(
        "--lr",
        type=float,
        default=0.0005,
        help="the policy's lr (low: the base must not be forgotten)",
    )
    p.add_argument("--base-epochs", type=int, default=3)
    p.add_argument("--window", type=float, default=8.0, help="seconds per latency window")
    p.add_argument("--after-s", type=float, default=20.0, help="shifted load on the new version")
    p.add_argument("--drift-rate", type=float, default=0.2, help="REFIT_DRIFT__SAMPLE_RATE")
    p.add_argument("--head-labels", type=int, default=10, help="the head-only policy's labels")
    p.add_argument("--head-epochs", type=int, default=20)
    p.add_argument("--head-lr", type=float, default=0.01)
    p.add_argument("--no-head-only", action="store_true", help="skip the head-only loop")
    p.add_argument("--no-jemalloc", action="store_true")
    args = p.parse_args()
    malloc = reexec_with_jemalloc(not args.no_jemalloc)

    import ray

    from service import deployments
    from service.embedded_store import EmbeddedStore
    from service.settings import CaptureSettings, DriftSettings, RefitSettings, ServeSettings
    from training.storage.s3 import ObjectStore

    plain, plain_labels = digits(invert=False)
    shifted, shifted_labels = digits(invert=True)
    held_out = list(range(len(shifted) - 150, len(shifted)))  # never predicted by the client
    stream = [shifted[i] for i in range(len(shifted) - 150)]
    stream_labels = shifted_labels[: len(stream)]
    eval_shifted = ([shifted[i] for i in held_out], [shifted_labels[i] for i in held_out])
    eval_plain = ([plain[i] for i in held_out], [plain_labels[i] for i in held_out])

    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            settings = RefitSettings(
                s3=conn.s3_settings(),
                serve=ServeSettings(
                    port=free_port(), admin_token=ADMIN, label_token=LABEL, poll_interval_s=30
                ),
                capture=CaptureSettings(refresh_s=1.0),
                drift=DriftSettings(sample_rate=args.drift_rate, flush_s=1.0),
            )
            store = ObjectStore(settings.s3)
            demo_base(settings, store, args.base_epochs)
            url = f"http://127.0.0.1:{settings.serve.port}"
            # capture's cost alone: every latency window with drift sampling off, like with
            # like; then the loop on a deployment that samples drift
            quiet = settings.model_copy(update={"drift": DriftSettings(sample_rate=0.0)})
            deployments.run(quiet)
            run_load(f"{url}/v1/models/{MODEL}/predict", plain[:64], concurrency=2, seconds=2)
            rows = latency(url, plain[:200], args.window)
            deployments.shutdown()
            deployments.run(settings)
            # unshifted traffic first: the drift windows' in-distribution figure
            run_load(
                f"{url}/v1/models/{MODEL}/predict",
                plain[:200],
                concurrency=2,
                seconds=3 * args.window,
            )
            # every prediction captured from here on: the labelling client labels any of them
            policy = {"rate": 1.0, "max_per_hour": 1_000_000, "max_per_class_per_hour": None}
            _admin("PUT", f"{url}/v1/models/{MODEL}/capture", json=policy)
            time.sleep(2.5)  # drift windows reach the store within flush_s; the policy applies
            drifts = {"unshifted": drift(url)}

            before = {
                "shifted": accuracy(url, *eval_shifted),
                "unshifted": accuracy(url, *eval_plain),
            }
            _log(f"before: {before}")
            policy = {
                "every_n_labels": args.labels,
                "cooldown_s": 3600,
                "epochs": args.epochs,
                "lr": args.lr,
                "batch_size": 32,
            }
            _admin("PUT", f"{url}/v1/models/{MODEL}/retrain-policy", json=policy)
            _policy_seen(url, MODEL)
            with Background(url, stream) as load:  # the shift: every client sends it now
                predicted, labelled, t_trigger, job = label_until_fired(
                    url, stream, stream_labels, fraction=args.label_fraction
                )
                _log(f"{labelled} labels on {predicted} predictions fired the policy")
                _log(f"job {job['job_id']}: {job['trigger']['detail']}")
                job = _wait_until_ended(url, job["job_id"], on_wait=lambda: drift(url))
                drifts["shifted, serving version"] = job.pop("last_wait")
                version = job["result"]["version"]
                if not job["result"]["published"]:
                    raise RuntimeError(f"not published: {job['reason']}")
                t_live = _first_answer(load, version)
                time.sleep(args.after_s)  # shifted traffic on the new version
                drifts["shifted, new version"] = drift(url)
            _log(f"drift: {drifts}")
            statuses = dict(load.statuses)
            after = {
                "shifted": accuracy(url, *eval_shifted),
                "unshifted": accuracy(url, *eval_plain),
            }
            _log(f"after: {after}")
            labelling_client(  # labels on the new version's answers: its live accuracy
                url,
                stream[::-1],
                stream_labels[::-1],
                wanted=args.labels // 2,
                fraction=args.label_fraction,
            )
            quality = _admin("GET", f"{url}/v1/models/{MODEL}/quality")
            head = None
            if not args.no_head_only:
                head = head_only_loop(url, store, stream, stream_labels, args)
            deployments.shutdown()
        finally:
            ray.shutdown()

    result = job["result"]
    job_s = _ts(job["finished_at"]) - _ts(job["started_at"])
    phases = result["phases"]
    epochs_s = phases["epochs_s"]
    graphs_after_s = phases.get("graphs_after_s", 0.0)

    def p50(rate: float) -> float:
        return statistics.mean(r["p50_ms"] for r in rows if r["run"] == _capture_run(rate))

    rows.append(
        loop_row(
            "loop: trigger label -> new version",
            job,
            t_trigger,
            t_live,
            (predicted, labelled),
            statuses,
        )
    )
    if head is not None:
        rows.append(head[0])
    extra = {
        "allocator": malloc,
        "capture_p50_delta_ms": {
            f"rate {r:g}": round(p50(r) - p50(0), 2) for r in CAPTURE_RATES[1:]
        },
        "drift": drifts,
        "drift_sample_rate": args.drift_rate,
        "accuracy_before": before,
        "accuracy_after": after,
        "live_accuracy_by_version": {v: q["accuracy"] for v, q in quality["versions"].items()},
        "trigger": job["trigger"]["detail"],
        "gate": result["gate"]["reasons"],
        "forgetting": result["gate"]["forgetting"],
        "job_phases_s": phases,
        "job_phase_details_s": result.get("phase_details"),
        # to the version answering: graphs made after it went live are not part of it
        "fixed_cost_s": round(job_s - epochs_s - graphs_after_s, 2),
        "fixed_cost_over_epoch_time": round(
            (job_s - epochs_s - graphs_after_s) / max(epochs_s, 1e-9), 2
        ),
        "graphs_after_live_s": graphs_after_s,
        "epochs": result["epochs_run"],
        "dataset": job["trigger"]["dataset"]["images"],
        "statuses": statuses,
        **(head[1] if head is not None else {}),
    }
    report("loop", rows, extra)
    return 0


def _wait_until_ended(
    url: str, job_id: str, timeout: float = 1800, on_wait: Any = None
) -> dict[str, Any]:
    """The job's record once it ended; ``last_wait``: what ``on_wait()`` said last while
    waiting (every 2 s)."""
    deadline = time.monotonic() + timeout
    last, seen, asked = None, None, 0.0
    while time.monotonic() < deadline:
        job = _admin("GET", f"{url}/v1/finetune-jobs/{job_id}")
        if job["state"] in {"succeeded", "failed", "cancelled"}:
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job['state']}: {job['reason']}")
            return {**job, "last_wait": seen}
        if on_wait is not None and time.monotonic() - asked > 2:
            seen, asked = on_wait(), time.monotonic()
        epoch = (job["progress"] or {}).get("epochs_done")
        if epoch != last:
            _log(f"job {job['state']}, epoch {epoch}/{job['progress'].get('epochs')}")
            last = epoch
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not end in {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
