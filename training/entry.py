"""Shared entry logic of ``refit finetune --local`` and ``python -m training``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from training.errors import RefitError, SpecError
from training.settings import RefitSettings


def load_spec_file(path: str) -> Any:
    """Read a spec file's JSON (SpecError naming the file when unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read spec: {exc}", field="spec") from None


def run_spec_file(path: str, settings: RefitSettings) -> int:
    """Validate and run a spec file on Ray; print the JSON result (or the JSON error on
    stderr). Exit code 0 published or gated, 2 for a bad spec or data, 1 otherwise."""
    from training.job import run_finetune
    from training.spec import parse_spec
    from training.trainer import ensure_ray

    try:
        spec = parse_spec(load_spec_file(path), settings.training)
        ensure_ray(settings.ray)
        result = run_finetune(spec, settings)
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    print(json.dumps(result, indent=2))
    return 0


def run_job_record(job_id: str, settings: RefitSettings) -> int:
    """Run the job a record describes (its spec, its id); print the result like
    :func:`run_spec_file`. The record ends succeeded or failed either way."""
    from training.job import run_finetune
    from training.jobs import JobStore
    from training.spec import parse_spec
    from training.store import ObjectStore
    from training.trainer import ensure_ray

    try:
        record = JobStore(ObjectStore(settings.s3)).get(job_id)
        spec = parse_spec(record.spec, settings.training)
        ensure_ray(settings.ray)
        result = run_finetune(spec, settings, job_id=job_id)
    except RefitError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2 if exc.status < 500 else 1
    print(json.dumps(result, indent=2))
    return 0
