"""Jobs run from this process rather than by the job runner: ``refit finetune --local``
(a spec file) and ``refit run-job ID`` (the entrypoint of the RayJobs that the runner launches
with ``REFIT_TRAINING__LAUNCHER=rayjob``: the record's spec, under its id)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from service.settings import RefitSettings
from training.storage.errors import RefitError, SpecError


def load_spec_file(path: str) -> Any:
    """Read a spec file's JSON (SpecError naming the file when unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read spec: {exc}", field="spec") from None


def _run(
    settings: RefitSettings, spec_json: Any, job_id: str | None, owner: str | None = None
) -> int:
    """Validate and run on Ray; print the JSON result (or the JSON error on stderr). Exit
    code 0 published or gated, 2 for a bad spec or data, 1 otherwise."""
    from service.control.notices import notify
    from training.finetune import run_finetune
    from training.ray_train import ensure_ray
    from training.spec import parse_spec

    try:
        spec = parse_spec(spec_json, settings.training)
        ensure_ray(settings.ray)
        result = run_finetune(
            spec, s3=settings.s3, training=settings.training, job_id=job_id, owner=owner
        )
        if result["published"]:
            # replicas on this Ray follow at once (best effort: elsewhere they poll)
            notify(settings, spec.model)
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    print(json.dumps(result, indent=2))
    return 0


def run_spec_file(path: str, settings: RefitSettings) -> int:
    """Run the job a spec file describes (a new record)."""
    try:
        spec_json = load_spec_file(path)
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2
    return _run(settings, spec_json, None)


def run_job_record(job_id: str, settings: RefitSettings, *, owner: str | None = None) -> int:
    """Run the job a record describes (its spec, its id) under the lease token ``owner`` (a
    RayJob's, given by the runner that launched it); the record ends succeeded or failed
    either way. A job another live owner runs is refused (exit 2)."""
    from training.storage.jobs import JobStore
    from training.storage.s3 import ObjectStore

    try:
        record = JobStore(ObjectStore(settings.s3)).get(job_id)
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    return _run(settings, record.spec, job_id, owner)
