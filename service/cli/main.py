"""``refit``: the command line (one function per command, then the parser: long, not deep).

* ``refit store up --data-dir D``: run the embedded SeaweedFS in the foreground.
* ``refit finetune --spec F [--wait]``: start a job on a running service (``--local``: run it
  on a local or configured Ray from this process instead).
* ``refit run-job ID``: run a job record's spec here (the entrypoint of launched RayJobs).
* ``refit jobs [ID] [--cancel]``: list jobs, show one, or cancel it.
* ``refit predict --model M IMAGE...``: classify image files with a running service.
* ``refit up --data-dir D``: store + Ray + the Serve app + the demo model, in the foreground.
* ``refit weights prefetch resnet18:IMAGENET1K_V1 ...``: fill the torch hub cache (images).
* ``refit demo --data-dir D``: store + Ray + digits datasets + pretrained base + fine-tune.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from service.cli.client import Client, ClientError, progress_line
from service.cli.loop import add_loop_commands
from service.embedded_store import Connection, EmbeddedStore
from service.settings import RefitSettings, get_settings
from training.storage.errors import RefitError


def _with_store(settings: RefitSettings, data_dir: str | None) -> RefitSettings:
    """Settings pointing at the embedded store of ``data_dir`` (its connection.json)."""
    if not data_dir:
        return settings
    conn = Connection.read(Path(data_dir))
    return settings.model_copy(update={"s3": conn.s3_settings(prefix=settings.s3.prefix)})


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_store_up(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Run SeaweedFS until SIGINT/SIGTERM; connection.json tells clients where it is."""
    store = EmbeddedStore(
        Path(args.data_dir),
        bucket=settings.s3.bucket,
        s3_port=args.port if args.port is not None else settings.store.s3_port,
        start_timeout_s=settings.store.start_timeout_s,
        stop_timeout_s=settings.store.stop_timeout_s,
    )
    conn = store.start()
    print(
        json.dumps(
            {
                "endpoint": conn.endpoint,
                "bucket": conn.bucket,
                "connection_file": str(Path(args.data_dir) / "connection.json"),
            }
        ),
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        print("stopping the object store...", file=sys.stderr, flush=True)
        store.stop()
    return 0


def cmd_finetune(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Start a job on the service (``--wait``: follow it), or run it here (``--local``)."""
    from service.control.local import load_spec_file, run_spec_file

    if args.local:
        return run_spec_file(args.spec, _with_store(settings, args.data_dir))
    client = Client.configured(settings, args.data_dir)
    job = client.start_job(load_spec_file(args.spec), args.idempotency_key)
    print(json.dumps({k: job[k] for k in ("job_id", "state", "links")}), flush=True)
    if not args.wait:
        return 0
    job = client.wait(job["job_id"])
    print(json.dumps({k: job[k] for k in ("job_id", "state", "reason", "result", "error")}))
    return 0 if job["state"] == "succeeded" else 1


def cmd_run_job(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Run a job record's spec under its id (the entrypoint of launched RayJobs)."""
    from service.control.local import run_job_record

    return run_job_record(args.job_id, _with_store(settings, args.data_dir), owner=args.owner)


def cmd_jobs(args: argparse.Namespace, settings: RefitSettings) -> int:
    """List jobs, show one, or cancel one."""
    client = Client.configured(settings, args.data_dir)
    if args.job_id is None:
        query = f"?limit={args.limit}" + (f"&state={args.state}" if args.state else "")
        for job in client.call("GET", "/v1/finetune-jobs" + query)["jobs"]:
            print(f"{job['job_id']}  {job['state']:<9}  {job['model']:<20}  {job['reason'] or ''}")
        return 0
    if args.cancel:
        job = client.call("POST", f"/v1/finetune-jobs/{args.job_id}/cancel")
    else:
        job = client.call("GET", f"/v1/finetune-jobs/{args.job_id}")
    print(json.dumps(job, indent=2))
    print(progress_line(job), file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Classify image files with the serving version of a model."""
    client = Client.configured(settings, args.data_dir)
    result = client.predict(args.model, [Path(p) for p in args.images], top_k=args.top_k)
    print(json.dumps(result, indent=2))
    return 0


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def cmd_import(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Publish weights trained elsewhere as a verified version (bring your own model)."""
    client = Client.configured(settings, args.data_dir)
    client.timeout_s = args.timeout
    classes = (
        Path(args.classes_file).read_text().split()
        if args.classes_file
        else [c for c in (args.classes or "").split(",") if c]
    )
    calibration: list[Path] = []
    for item in args.calibration:
        path = Path(item)
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        calibration += [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    metadata: dict[str, Any] = {
        "backbone": args.backbone,
        "class_names": classes,
        "preprocessing": json.loads(args.preprocessing),
        "source": args.source,
    }
    if args.graphs is not None:
        metadata["graphs"] = [g for g in args.graphs.split(",") if g]
    if args.promote:
        metadata["promote"] = args.promote
    _log(f"uploading {args.weights} and {len(calibration)} calibration images")
    result = client.import_weights(args.model, Path(args.weights), metadata, calibration)
    print(json.dumps(result, indent=2))
    return 0


def _bootstrap_demo(
    settings: RefitSettings, *, few: int, base_epochs: int, workers: int, always: bool
) -> dict[str, Any]:
    """Demo datasets, the pretrained base (once) and the digits-5to9 fine-tune (once, or
    again when ``always``)."""
    from training import demo
    from training.finetune import run_finetune
    from training.spec import parse_spec
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    store = ObjectStore(settings.s3)
    registry = Registry(store)
    _log("writing the digits datasets")
    demo.write_demo_datasets(store, few=few)
    out: dict[str, Any] = {}
    if registry.get_alias(demo.BASE_MODEL, "production")[0] is None:
        _log("training the pretrained base on digits 0-4 (from scratch)")
        spec = parse_spec(demo.base_spec(store, epochs=base_epochs), settings.training)
        out["base"] = run_finetune(spec, s3=settings.s3, training=settings.training)
    if always or registry.get_alias(demo.TARGET, "production")[0] is None:
        _log("fine-tuning digits 5-9 from the base")
        spec = parse_spec(demo.target_spec(store, workers=workers), settings.training)
        out["finetune"] = run_finetune(spec, s3=settings.s3, training=settings.training)
    for job in out.values():  # confusion matrices are in the manifest; keep the print short
        job["metrics"].pop("confusion", None)
        job["metrics"].pop("per_class", None)
    return out


def _local_ray(settings: RefitSettings) -> RefitSettings:
    # Serve replicas hold CPUs while the demo trains; logical CPUs are cheap on a laptop.
    if settings.ray.address or settings.ray.num_cpus:
        return settings
    cpus = max(os.cpu_count() or 1, 4)
    return settings.model_copy(update={"ray": settings.ray.model_copy(update={"num_cpus": cpus})})


def cmd_demo(args: argparse.Namespace, settings: RefitSettings) -> int:
    """The offline demo, end to end, on the embedded store and a local Ray."""
    from training.ray_train import ensure_ray

    embedded = EmbeddedStore(Path(args.data_dir), bucket=settings.s3.bucket)
    conn = embedded.start()
    try:
        settings = settings.model_copy(update={"s3": conn.s3_settings(settings.s3.prefix)})
        ensure_ray(_local_ray(settings).ray)
        out = _bootstrap_demo(
            settings, few=args.few, base_epochs=args.base_epochs, workers=args.workers, always=True
        )
        print(json.dumps({"store": conn.endpoint, **out}, indent=2))
        return 0 if out["finetune"]["published"] else 1
    finally:
        _log("stopping the object store (about 15 s)")
        embedded.stop()


def _tokens(data_dir: Path) -> dict[str, str]:
    """API tokens: kept across restarts of the same data dir, generated the first time."""
    path = data_dir / "connection.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    return {
        "admin_token": current.get("admin_token") or secrets.token_urlsafe(24),
        "predict_token": current.get("predict_token") or secrets.token_urlsafe(24),
        "metrics_token": current.get("metrics_token") or secrets.token_urlsafe(24),
    }


def _stop_on_sigterm() -> None:
    # SIGTERM raises KeyboardInterrupt like Ctrl-C, wherever the main thread is (store or Ray
    # starting, the demo training, serving): the cleanup below runs in every phase. Again
    # after ray.init, whose own handlers (sys.exit in Python, a C++ one that aborts the
    # process) replace it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _serve_until_signal() -> None:
    while True:
        signal.pause()


def cmd_up(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Store + Ray + the Serve app + the demo model; foreground until SIGINT/SIGTERM, which
    stop everything it started in whatever phase they arrive (within the store's stop timeout
    plus Serve's and Ray's shutdown)."""
    import ray

    from service import deployments
    from service.allocator import reexec_with_jemalloc
    from service.cli.console import JobConsole, ray_output_to_files
    from service.embedded_store import update_connection_file
    from training.ray_train import ensure_ray, session_logs
    from training.storage.jobs import JobStore
    from training.storage.s3 import ObjectStore

    # before anything starts: the preload must be in place when the process begins
    allocator = reexec_with_jemalloc(
        ["-m", "service.cli", *sys.argv[1:]], enabled=settings.serve.jemalloc
    )
    _log(f"allocator: {allocator}")
    _stop_on_sigterm()
    data_dir = Path(args.data_dir)
    logs = data_dir / "logs"
    ray_log = ray_output_to_files(logs, None)
    embedded = EmbeddedStore(data_dir, bucket=settings.s3.bucket)
    deployed = False
    console: JobConsole | None = None
    try:
        conn = embedded.start()
        tokens = _tokens(data_dir)
        serve_conf = settings.serve.model_copy(
            update={
                "port": args.port if args.port is not None else settings.serve.port,
                "admin_token": SecretStr(tokens["admin_token"]),
                "predict_token": SecretStr(tokens["predict_token"]),
                "metrics_token": SecretStr(tokens["metrics_token"]),
            }
        )
        # Ray's output to files (the console is for what a user acts on); the demo's epochs
        # are printed once, by the job console, like every other job's
        quiet = {"log_to_driver": False}
        settings = _local_ray(settings).model_copy(
            update={
                "s3": conn.s3_settings(settings.s3.prefix),
                "serve": serve_conf,
                "ray": _local_ray(settings).ray.model_copy(update=quiet),
                "training": settings.training.model_copy(update={"echo_progress": False}),
            }
        )
        _log("starting Ray and the service")
        ensure_ray(settings.ray)
        _stop_on_sigterm()
        ray_output_to_files(logs, session_logs())
        deployed = True
        deployments.run(settings)
        ray_output_to_files(logs, session_logs())  # Serve's logger has its own handler
        _stop_on_sigterm()
        url = f"http://{settings.serve.host}:{settings.serve.port}"
        update_connection_file(data_dir, {"url": url, **tokens})
        console = JobConsole(JobStore(ObjectStore(settings.s3)), emit=_log)
        console.start()
        print(
            json.dumps({"url": url, "connection_file": str(data_dir / "connection.json")}),
            flush=True,
        )
        _log(f"serving on {url}; the API tokens are in {data_dir / 'connection.json'}")
        _log(f"Ray's output: {ray_log} and {logs / 'ray'}")
        if not args.no_demo:
            _bootstrap_demo(settings, few=20, base_epochs=6, workers=2, always=False)
        console.poll()  # the demo's end is reported before "ready"
        _log(f"ready on {url}; Ctrl-C stops everything")
        _serve_until_signal()
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's handler, before ours is back
        _log("signal received")
    finally:
        # a second signal must not cut the cleanup short (each step is bounded)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _log("stopping Serve, Ray and the object store")
        if console is not None:
            console.stop()
        try:
            if deployed:
                with contextlib.suppress(Exception):
                    deployments.shutdown()
            # also a Ray interrupted while it started (its processes exist, init did not end)
            with contextlib.suppress(Exception):
                ray.shutdown()
        finally:
            embedded.stop()
    return 0


def cmd_weights_prefetch(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Download torchvision weights into the torch hub cache ($TORCH_HOME)."""
    from training.weights import prefetch

    for path in prefetch(args.items):
        print(path, flush=True)
    return 0


def _log(msg: str) -> None:
    print(f"[refit] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``refit``."""
    p = argparse.ArgumentParser(
        prog="refit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    store = sub.add_parser("store", help="the embedded object store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    up = store_sub.add_parser("up", help="run SeaweedFS in the foreground")
    up.add_argument("--data-dir", required=True)
    up.add_argument("--port", type=int, default=None, help="S3 port (default: settings)")
    up.set_defaults(func=cmd_store_up)

    ft = sub.add_parser("finetune", help="start a fine-tune job on the service")
    ft.add_argument("--spec", required=True)
    ft.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    ft.add_argument("--idempotency-key", default=None, help="retries get the same job back")
    ft.add_argument("--local", action="store_true", help="run on Ray from this process")
    ft.add_argument(
        "--data-dir", default=None, help="connection.json (or, with --local, the store) of this dir"
    )
    ft.set_defaults(func=cmd_finetune)

    rj = sub.add_parser("run-job", help="run a job record here (a RayJob's entrypoint)")
    rj.add_argument("job_id")
    rj.add_argument("--data-dir", default=None, help="the embedded store of this dir")
    rj.add_argument(
        "--owner", default=None, help="the lease token the launcher gave (unset: a new one)"
    )
    rj.set_defaults(func=cmd_run_job)

    jobs = sub.add_parser("jobs", help="list jobs, show one, or cancel it")
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--cancel", action="store_true")
    jobs.add_argument("--state", default=None)
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--data-dir", default=None)
    jobs.set_defaults(func=cmd_jobs)

    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("--model", required=True)
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--data-dir", default=None)
    pr.add_argument("images", nargs="+")
    pr.set_defaults(func=cmd_predict)

    im = sub.add_parser("import", help="publish weights trained elsewhere (safetensors)")
    im.add_argument("--model", required=True)
    im.add_argument("--weights", required=True, help="the state dict as .safetensors")
    im.add_argument("--backbone", required=True, help="a torchvision architecture, e.g. resnet18")
    names = im.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="class names, comma-separated, in head order")
    names.add_argument("--classes-file", help="class names, one per line, in head order")
    im.add_argument(
        "--preprocessing",
        default='{"resize_size": 256, "crop_size": 224}',
        help="Preprocessing as JSON (mean and std default to ImageNet's)",
    )
    im.add_argument(
        "--calibration", nargs="*", default=[], help="images or folders of images (>= 200)"
    )
    im.add_argument("--graphs", default=None, help="openvino,int8 (default: the service's)")
    im.add_argument("--promote", default=None, help="point this alias at the new version")
    im.add_argument("--source", default=None, help="a provenance note kept in the manifest")
    im.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait")
    im.add_argument("--data-dir", default=None)
    im.set_defaults(func=cmd_import)

    upp = sub.add_parser("up", help="store + Ray + the service + the demo model (foreground)")
    upp.add_argument("--data-dir", default=".refit")
    upp.add_argument("--port", type=int, default=None, help="HTTP port (default: settings)")
    upp.add_argument("--no-demo", action="store_true", help="skip the demo bootstrap")
    upp.set_defaults(func=cmd_up)

    wt = sub.add_parser("weights", help="pretrained weights")
    wt_sub = wt.add_subparsers(dest="weights_command", required=True)
    pf = wt_sub.add_parser("prefetch", help="download backbone:WEIGHTS into the torch hub cache")
    pf.add_argument("items", nargs="+", help="e.g. resnet18:IMAGENET1K_V1 resnet50:DEFAULT")
    pf.set_defaults(func=cmd_weights_prefetch)

    dm = sub.add_parser("demo", help="offline demo: digits, pretrained base, fine-tune")
    dm.add_argument("--data-dir", default=".refit")
    dm.add_argument("--few", type=int, default=20, help="target labels per class")
    dm.add_argument("--base-epochs", type=int, default=6)
    dm.add_argument("--workers", type=int, default=2)
    dm.set_defaults(func=cmd_demo)
    add_loop_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``refit`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, get_settings()))
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    except ClientError as exc:
        print(json.dumps(exc.body), file=sys.stderr)
        return 2 if 400 <= exc.status < 500 else 1
