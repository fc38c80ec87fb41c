"""``refit``: the command line.

* ``refit store up --data-dir D``: run the embedded SeaweedFS in the foreground.
* ``refit finetune --local --spec F``: run one fine-tune job on a local (or configured) Ray.
* ``refit demo --data-dir D``: store + Ray + digits datasets + pretrained base + fine-tune.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from training.errors import RefitError
from training.seaweed import Connection, EmbeddedStore
from training.settings import RefitSettings, get_settings


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
    """Run a spec on Ray from this process (``--local``)."""
    from training.entry import run_spec_file

    if not args.local:
        print(
            "only --local is available here; the HTTP API comes with the service", file=sys.stderr
        )
        return 2
    return run_spec_file(args.spec, _with_store(settings, args.data_dir))


def cmd_demo(args: argparse.Namespace, settings: RefitSettings) -> int:
    """The offline demo, end to end, on the embedded store and a local Ray."""
    from training import demo
    from training.job import run_finetune
    from training.registry import Registry
    from training.spec import parse_spec
    from training.store import ObjectStore
    from training.trainer import ensure_ray

    data_dir = Path(args.data_dir)
    embedded = EmbeddedStore(data_dir, bucket=settings.s3.bucket)
    conn = embedded.start()
    try:
        settings = settings.model_copy(update={"s3": conn.s3_settings(settings.s3.prefix)})
        store = ObjectStore(settings.s3)
        ensure_ray(settings.ray)
        _log("writing the digits datasets")
        demo.write_demo_datasets(store, few=args.few)
        out: dict[str, Any] = {"store": conn.endpoint}
        if Registry(store).get_alias(demo.BASE_MODEL, "production")[0] is None:
            _log("training the pretrained base on digits 0-4 (from scratch)")
            spec = parse_spec(demo.base_spec(store, epochs=args.base_epochs), settings.training)
            out["base"] = run_finetune(spec, settings)
        _log("fine-tuning digits 5-9 from the base")
        spec = parse_spec(demo.target_spec(store, workers=args.workers), settings.training)
        out["finetune"] = run_finetune(spec, settings)
        for job in ("base", "finetune"):
            if job in out:  # the confusion matrices are in the manifest; keep the print short
                out[job]["metrics"].pop("confusion", None)
                out[job]["metrics"].pop("per_class", None)
        print(json.dumps(out, indent=2))
        return 0 if out["finetune"]["published"] else 1
    finally:
        _log("stopping the object store (about 15 s)")
        embedded.stop()


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

    ft = sub.add_parser("finetune", help="run a fine-tune job")
    ft.add_argument("--spec", required=True)
    ft.add_argument("--local", action="store_true", help="run on Ray from this process")
    ft.add_argument("--data-dir", default=None, help="use the embedded store of this dir")
    ft.set_defaults(func=cmd_finetune)

    dm = sub.add_parser("demo", help="offline demo: digits, pretrained base, fine-tune")
    dm.add_argument("--data-dir", default=".refit")
    dm.add_argument("--few", type=int, default=20, help="target labels per class")
    dm.add_argument("--base-epochs", type=int, default=6)
    dm.add_argument("--workers", type=int, default=2)
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``refit`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, get_settings()))
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1


if __name__ == "__main__":
    sys.exit(main())
