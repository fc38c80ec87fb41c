"""The storage contract that the training library and the service share.

One bucket (and an optional key prefix) holds everything; each key prefix has one owner here:

=====================  ===============================================================
``models/``            :class:`Registry` (versions, manifests, aliases)
``jobs/``              :class:`JobStore` (records, progress, step reports, active markers,
                       idempotency claims, the placement groups a run reserved)
``runs/``              :class:`JobStore` names them (``runs/{job_id}``); Ray Train writes them
``datasets/``          read through :meth:`ObjectStore.key_from_uri` (user URIs, allow-listed)
=====================  ===============================================================

:class:`ObjectStore` is the only code that talks to boto3. Errors are one hierarchy
(:class:`RefitError`), each class carrying its HTTP status; ids match one strict pattern.

Inside ``training`` import the submodules; this package's namespace is the surface for
``service``.
"""

from __future__ import annotations

import importlib
from typing import Any

# The names load their module on first use: a process that needs only settings, ids or job
# records (the registry-notice actor, the job runner) never imports torch with the registry.
_PUBLIC = {
    **dict.fromkeys(
        (
            "ConflictError",
            "DataError",
            "IntegrityError",
            "NotFoundError",
            "RefitError",
            "ResourceError",
            "SpecError",
            "StorageError",
            "TooManyJobsError",
            "TrainingError",
            "WeightsUnavailableError",
        ),
        "training.storage.errors",
    ),
    **dict.fromkeys(
        ("ID_PATTERN", "is_id", "new_job_id", "new_version_id"), "training.storage.ids"
    ),
    **dict.fromkeys(
        ("STATES", "TERMINAL", "JobRecord", "JobState", "JobStore", "progress_view"),
        "training.storage.job_records",
    ),
    "S3Settings": "training.storage.location",
    **dict.fromkeys(("AliasRecord", "Manifest", "Registry"), "training.storage.registry"),
    **dict.fromkeys(("ObjectInfo", "ObjectStore"), "training.storage.s3"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'training.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
