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

from training.storage.errors import (
    ConflictError,
    DataError,
    IntegrityError,
    NotFoundError,
    RefitError,
    ResourceError,
    SpecError,
    StorageError,
    TooManyJobsError,
    TrainingError,
    WeightsUnavailableError,
)
from training.storage.ids import ID_PATTERN, is_id, new_job_id, new_version_id
from training.storage.job_records import (
    STATES,
    TERMINAL,
    JobRecord,
    JobState,
    JobStore,
    progress_view,
)
from training.storage.location import S3Settings
from training.storage.registry import AliasRecord, Manifest, Registry
from training.storage.s3 import ObjectInfo, ObjectStore

__all__ = [
    "ID_PATTERN",
    "STATES",
    "TERMINAL",
    "AliasRecord",
    "ConflictError",
    "DataError",
    "IntegrityError",
    "JobRecord",
    "JobState",
    "JobStore",
    "Manifest",
    "NotFoundError",
    "ObjectInfo",
    "ObjectStore",
    "RefitError",
    "Registry",
    "ResourceError",
    "S3Settings",
    "SpecError",
    "StorageError",
    "TooManyJobsError",
    "TrainingError",
    "WeightsUnavailableError",
    "is_id",
    "new_job_id",
    "new_version_id",
    "progress_view",
]
