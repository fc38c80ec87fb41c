"""``refit capture``, ``refit feedback``, ``refit quality`` and ``refit policy``: the
adaptation loop from the command line, over the HTTP API (``REFIT_URL`` and ``REFIT_TOKEN``,
else the data dir's ``connection.json``)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli.client import Client
from service.settings import RefitSettings


def _show(value: Any) -> None:
    print(json.dumps(value, indent=2))


def cmd_capture(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Show or set a model's capture policy, or list what it captured."""
    client = Client.configured(settings, args.data_dir)
    base = f"/v1/models/{args.model}"
    if args.list:
        query = f"?limit={args.limit}" + (f"&after={args.after}" if args.after else "")
        _show(client.call("GET", f"{base}/captures{query}"))
        return 0
    policy: dict[str, Any] = {}
    for name in ("rate", "low_confidence_below", "margin_below", "max_per_hour"):
        if getattr(args, name) is not None:
            policy[name] = getattr(args, name)
    if args.max_per_class_per_hour is not None:
        policy["max_per_class_per_hour"] = args.max_per_class_per_hour or None
    if args.off:
        policy = {"rate": 0.0}
    if policy:
        current = client.call("GET", f"{base}/capture")["policy"]
        merged = {**current, **policy} if not args.off else policy
        _show(client.call("PUT", f"{base}/capture", merged))
    else:
        _show(client.call("GET", f"{base}/capture"))
    return 0


def cmd_feedback(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Send a label (for a prediction id, or for image files), show what was labelled, or
    snapshot it as a dataset."""
    client = Client.configured(settings, args.data_dir)
    base = f"/v1/models/{args.model}/feedback"
    if args.dataset:
        _show(client.call("POST", f"{base}/dataset"))
        return 0
    if args.label is None:
        _show(client.call("GET", base))
        return 0
    bodies: list[dict[str, Any]] = []
    common = {"label": args.label, "new_class": args.new_class}
    if args.prediction_id:
        bodies.append({**common, "prediction_id": args.prediction_id, "index": args.index})
    for path in args.images:
        bodies.append({**common, "image": base64.b64encode(Path(path).read_bytes()).decode()})
    if not bodies:
        print("give --prediction-id or image files", file=sys.stderr)
        return 2
    for n, body in enumerate(bodies, start=1):
        out = client.call("POST", base, body)
        print(f"[{n}/{len(bodies)}] {out['sha256'][:12]} {out['label']} ({out['split']})")
    return 0


def cmd_quality(args: argparse.Namespace, settings: RefitSettings) -> int:
    """A model's live quality: accuracy over the last labels, per version, per hour."""
    client = Client.configured(settings, args.data_dir)
    report = client.call("GET", f"/v1/models/{args.model}/quality?last={args.last}")
    _show(report)
    return 0


_POLICY_FIELDS = (
    "every_n_labels",
    "accuracy_below",
    "window_labels",
    "drift_above",
    "drift_samples",
    "every_s",
    "cooldown_s",
    "max_concurrent",
    "base_dataset",
    "freeze",
    "min_accuracy",
    "max_regression",
    "epochs",
    "lr",
    "batch_size",
)


def _freeze(value: str) -> dict[str, Any]:
    """A freeze policy from its name (no parameters) or JSON (the server validates it)."""
    if not value.lstrip().startswith("{"):
        return {"policy": value}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError('a JSON object, e.g. {"policy": "head_only"}')
    return parsed


def cmd_policy(args: argparse.Namespace, settings: RefitSettings) -> int:
    """Show, set (fields given on the command line, over the stored ones) or remove a model's
    retrain policy."""
    client = Client.configured(settings, args.data_dir)
    path = f"/v1/models/{args.model}/retrain-policy"
    if args.delete:
        _show(client.call("DELETE", path))
        return 0
    given = {f: getattr(args, f) for f in _POLICY_FIELDS if getattr(args, f) is not None}
    if args.wait:
        return _wait_for_firing(client, path, args.timeout)
    if not given:
        _show(client.call("GET", path))
        return 0
    current = client.call("GET", path)["policy"] or {}
    _show(client.call("PUT", path, {**current, **given}))
    return 0


def _wait_for_firing(client: Client, path: str, timeout: float) -> int:
    """Wait for the policy's next firing (a line per labels-so-far change), then follow the
    job it started with the progress bar; 0 once it succeeded."""
    first = client.call("GET", path)
    if first["policy"] is None:
        print("the model has no retrain policy", file=sys.stderr)
        return 2
    seen = (first["state"] or {}).get("fired", 0)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        state = client.call("GET", path)["state"] or {}
        if state.get("fired", 0) > seen and state.get("last_job_id"):
            job = client.wait(state["last_job_id"])
            _show({k: job[k] for k in ("job_id", "state", "reason", "trigger", "result")})
            return 0 if job["state"] == "succeeded" else 1
        line = f"waiting for the policy to fire ({state.get('last_error') or 'not yet'})"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        time.sleep(1.0)
    print(f"the policy did not fire within {timeout:.0f} s", file=sys.stderr)
    return 1


def add_loop_commands(sub: Any) -> None:
    """Register ``capture``, ``feedback``, ``quality`` and ``policy`` on the ``refit`` parser."""
    cap = sub.add_parser("capture", help="a model's capture policy, or what it captured")
    cap.add_argument("--model", required=True)
    cap.add_argument("--rate", type=float, default=None)
    cap.add_argument("--low-confidence-below", type=float, default=None)
    cap.add_argument("--margin-below", type=float, default=None)
    cap.add_argument("--max-per-hour", type=int, default=None)
    cap.add_argument("--max-per-class-per-hour", type=int, default=None, help="0: no cap")
    cap.add_argument("--off", action="store_true", help="capture nothing")
    cap.add_argument("--list", action="store_true", help="list captured predictions")
    cap.add_argument("--after", default=None)
    cap.add_argument("--limit", type=int, default=100)
    cap.add_argument("--data-dir", default=None)
    cap.set_defaults(func=cmd_capture)

    fb = sub.add_parser("feedback", help="send labels back, or snapshot them as a dataset")
    fb.add_argument("--model", required=True)
    fb.add_argument("--label", default=None)
    fb.add_argument("--prediction-id", default=None)
    fb.add_argument("--index", type=int, default=0)
    fb.add_argument("--new-class", action="store_true")
    fb.add_argument("--dataset", action="store_true", help="write the feedback dataset")
    fb.add_argument("--data-dir", default=None)
    fb.add_argument("images", nargs="*")
    fb.set_defaults(func=cmd_feedback)

    q = sub.add_parser("quality", help="a model's live quality from feedback")
    q.add_argument("--model", required=True)
    q.add_argument("--last", type=int, default=500)
    q.add_argument("--data-dir", default=None)
    q.set_defaults(func=cmd_quality)

    pol = sub.add_parser("policy", help="a model's retrain policy: show, set or remove")
    pol.add_argument("--model", required=True)
    pol.add_argument("--every-n-labels", type=int, default=None)
    pol.add_argument("--accuracy-below", type=float, default=None)
    pol.add_argument("--window-labels", type=int, default=None)
    pol.add_argument(
        "--drift-above", type=float, default=None, help="fire when the drift score exceeds it"
    )
    pol.add_argument(
        "--drift-samples", type=int, default=None, help="sampled images before drift is judged"
    )
    pol.add_argument("--every-s", type=float, default=None)
    pol.add_argument("--cooldown-s", type=float, default=None)
    pol.add_argument("--max-concurrent", type=int, default=None)
    pol.add_argument("--base-dataset", default=None)
    pol.add_argument(
        "--freeze",
        type=_freeze,
        default=None,
        help="what a retrain trains: head_only (seconds, on stored features), full, or a "
        'freeze policy as JSON (e.g. \'{"policy": "last_n_stages", "n": 2}\')',
    )
    pol.add_argument("--min-accuracy", type=float, default=None, help="its retrains' gate")
    pol.add_argument("--max-regression", type=float, default=None, help="its retrains' gate")
    pol.add_argument("--epochs", type=int, default=None)
    pol.add_argument("--lr", type=float, default=None)
    pol.add_argument("--batch-size", type=int, default=None)
    pol.add_argument("--delete", action="store_true")
    pol.add_argument(
        "--wait", action="store_true", help="wait for the next firing, then follow its job"
    )
    pol.add_argument("--timeout", type=float, default=86400.0, help="seconds --wait waits")
    pol.add_argument("--data-dir", default=None)
    pol.set_defaults(func=cmd_policy)
