"""A small job's fixed cost: where a fine-tune's time goes beyond its epochs, on both job paths.

The demo's target fine-tune (100 images, ``--epochs`` epochs) runs through the job runner on
the embedded stack (SeaweedFS, local Ray), as the API and the retrain policies run it:

* ``legacy`` (baseline, same run): ``REFIT_TRAINING__LEGACY_JOB_PATH=true`` and no warm
  process: a process started for the job, Ray Train even for one worker, a checkpoint after
  every epoch;
* ``fast`` (the default), ``--jobs`` times: the process the runner keeps warm, the one-worker
  job trained in it (``training.local_fit``), checkpoints by time;
* with ``--workers 2`` also a two-worker Ray Train job on each path (legacy, then the default:
  warm process, checkpoints by time);
* with ``--head-images N`` (default 1000) a ``head_only`` fine-tune of the demo base on N
  labelled digits (all ten classes), twice: features computed, then, after 10 more labels,
  a retrain whose features are on the store but those 10 (``training.feature_store``).

Each demo fine-tune is the first version of a model of its own (``digits-target-{n}``): no
serving version to beat, so every job publishes and both paths do the same work; under the
default numeric mode (``auto``) the legacy path makes the OpenVINO and INT8 graphs before it
publishes, the default path after its version is live (``graphs_after_s``, not in the fixed
cost). A retrain of a serving version (its score) is ``loop.py``'s job.

Per job: created -> ended (the queue wait included), its epochs' own time (train and
validation, measured by the worker), the fixed cost (the rest), its ratio to the epoch time and
to the legacy job's fixed cost, and the phases the rest went to. Going live after the job
(hot load) is measured by ``loop.py``.

    python benchmarks/job_cost.py [--jobs 3] [--epochs 8] [--base-epochs 2] [--workers 2]
                                  [--head-images 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Any

from common import demo_base, digits_store, report  # also puts the repository on sys.path
from load import reexec_with_jemalloc

PHASES = (
    "job_process_s",
    "index_s",
    "resolve_base_s",
    "ray_start_s",
    "ray_processes_s",
    "ray_worker_boot_s",
    "worker_setup_s",
    "checkpoints_s",
    "ray_stop_s",
    "train_other_s",
    "score_s",
    "reference_s",
    "score_serving_s",
    "graphs_s",
    "publish_s",
    "alias_s",
    "graphs_after_s",
    "other_s",
)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _wait_warm(runner: Any, timeout: float = 120) -> None:
    """Until the runner's warm job process is up (a loop's jobs come minutes apart)."""
    import ray

    from service.control.notices import NAMESPACE

    deadline = time.monotonic() + timeout
    while not (names := ray.get(runner.stats.remote())["warm_processes"]):
        if time.monotonic() > deadline:
            raise RuntimeError("no warm job process")
        time.sleep(0.2)
    ray.get(ray.get_actor(names[0], namespace=NAMESPACE).ready.remote(), timeout=timeout)


HEAD_DATASET = "digits-head"


def _head_spec(store: Any) -> dict[str, Any]:
    """A head-only fine-tune of the demo base on all ten digits."""
    from training import demo

    return {
        "model": "digits-head",
        "base": {"version": f"{demo.BASE_MODEL}@production"},
        "dataset": store.uri(f"datasets/{HEAD_DATASET}/"),
        "freeze": {"policy": "head_only"},
        "epochs": 10,
        "batch_size": 64,
        "lr": 0.01,
        "workers": 1,
        "augment": {"enabled": False},
    }


def _ten_more_labels(store: Any) -> None:
    """Ten images of the test split labelled into train (new content for the trunk)."""
    prefix = f"datasets/{HEAD_DATASET}/test/"
    for obj in list(store.list(prefix))[:10]:
        store.put_bytes(
            f"datasets/{HEAD_DATASET}/train/" + obj.key.removeprefix(prefix),
            store.get_bytes(obj.key),
        )


def _row(n: int, path: str, workers: int, record: Any, rows: list[dict[str, Any]]) -> dict:
    """One job's figures: created -> ended, epochs, fixed cost and its phases."""
    result = record.result
    phases = result["phases"]
    job_s = _ts(record.finished_at) - _ts(record.created_at)
    epochs_s = phases["epochs_s"]
    # the job's own clock starts in its process: the wait before it is queue and start-up
    phases["job_process_s"] = round(
        _ts(record.finished_at) - _ts(record.created_at) - result["seconds"], 2
    )
    # to the version answering: graphs made after it went live (numeric mode auto) are not
    # part of it (reported as graphs_after_s)
    fixed = round(job_s - epochs_s - phases.get("graphs_after_s", 0.0), 2)
    baseline = next(  # the same job on the legacy path (head-only jobs have none)
        (r["fixed_s"] for r in rows if r["path"] == "legacy" and r["workers"] == workers), None
    )
    if path.startswith("head_only"):
        baseline = None
    return {
        "job": n,
        "path": path,
        "workers": workers,
        "published": result["published"],
        "job_s": round(job_s, 2),
        "epochs_s": epochs_s,
        "fixed_s": fixed,
        "fixed_over_epochs": round(fixed / max(epochs_s, 1e-9), 2),
        "fixed_over_legacy": round(fixed / baseline, 3) if baseline else None,
        **{k: phases.get(k, result.get("phase_details", {}).get(k)) for k in PHASES},
    }


def main() -> int:
    """Run the jobs; print the table; write results/job_cost.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--base-epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="1: no multi-worker comparison")
    p.add_argument("--head-images", type=int, default=1000, help="0: no head-only retrains")
    p.add_argument("--no-jemalloc", action="store_true")
    args = p.parse_args()
    malloc = reexec_with_jemalloc(not args.no_jemalloc)

    import ray

    from service.control.runner_clients import existing_runner, runner_actor, stop_actors
    from training import demo
    from training.storage.jobs import JobStore

    runs = [("legacy", 1)] + [("fast", 1)] * args.jobs
    if args.workers > 1:
        runs += [("legacy", args.workers), ("fast", args.workers)]
    if args.head_images:
        runs += [("head_only computed", 1), ("head_only cached", 1)]
    rows: list[dict[str, Any]] = []
    with digits_store() as (settings, store):
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
        try:
            demo_base(settings, store, args.base_epochs)
            if args.head_images:
                per_class = max(2, args.head_images // 10)
                demo.write_digits(
                    store,
                    HEAD_DATASET,
                    list(range(10)),
                    train_per_class=per_class - per_class // 5,
                    val_per_class=per_class // 5,
                )
            jobs = JobStore(store)
            runner, current = None, None
            for n, (path, workers) in enumerate(runs):
                legacy = path == "legacy"
                if (legacy, workers) != current:  # a runner with this path's settings
                    current = (legacy, workers)
                    stop_actors(settings)
                    deadline = time.monotonic() + 60
                    while existing_runner(settings) is not None:  # its name is freed
                        if time.monotonic() > deadline:
                            raise RuntimeError("the previous job runner did not stop")
                        time.sleep(0.2)
                    training = settings.training.model_copy(
                        update={
                            "legacy_job_path": legacy,
                            "warm_job_processes": 0 if legacy else 1,
                        }
                    )
                    runner = runner_actor(settings.model_copy(update={"training": training}))
                if not legacy:
                    _wait_warm(runner)
                if path == "head_only cached":
                    _ten_more_labels(store)
                if path.startswith("head_only"):
                    spec = _head_spec(store)
                else:  # a model of its own: every job publishes (see the docstring)
                    spec = demo.target_spec(store, epochs=args.epochs, workers=workers)
                    spec["model"] = f"{demo.TARGET}-{n + 1}"
                job_id = ray.get(runner.create.remote(spec, None))["record"]["job_id"]
                deadline = time.monotonic() + 1800
                while not (record := jobs.get(job_id)).terminal:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"job {job_id} still {record.state} after 30 min")
                    time.sleep(0.2)
                if record.state != "succeeded" or record.result is None:
                    raise RuntimeError(f"job {job_id} {record.state}: {record.reason}")
                rows.append(_row(n + 1, path, workers, record, rows))
                _log(str(rows[-1]))
        finally:
            ray.shutdown()
    fast = [r["fixed_s"] for r in rows if r["path"] == "fast" and r["workers"] == 1]
    legacy_fixed = rows[0]["fixed_s"]
    extra = {
        "allocator": malloc,
        "epochs": args.epochs,
        "fixed_s_legacy": legacy_fixed,
        "fixed_s_fast_mean": round(sum(fast) / max(len(fast), 1), 2),
        "fixed_fast_over_legacy": round(sum(fast) / max(len(fast), 1) / legacy_fixed, 3),
    }
    report("job_cost", rows, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
