"""Refit's one error hierarchy.

Every class carries the HTTP status it maps to and a stable machine-readable code, so the API
layer turns any of them into ``{"error": {"code", "message", "field"}}`` with one handler table
and never has to guess. ``field`` names the offending input (a spec field, an item, a file).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class RefitError(Exception):
    """Base of every error Refit raises on purpose."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    code: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": {"code", "message"[, "field"]}}``."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}

    def __str__(self) -> str:
        if self.field is None or self.message.startswith(f"{self.field}:"):
            return self.message
        return f"{self.field}: {self.message}"


class SpecError(RefitError):
    """A fine-tune spec or request field is invalid."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_spec"


class DataError(RefitError):
    """The dataset cannot be trained on (empty, one class, mismatched splits, all corrupt)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_dataset"


class NotFoundError(RefitError):
    """A model, version, alias, job or object does not exist."""

    status = HTTPStatus.NOT_FOUND
    code = "not_found"


class ConflictError(RefitError):
    """A concurrent writer got there first (conditional write lost) or the id already exists."""

    status = HTTPStatus.CONFLICT
    code = "conflict"


class IntegrityError(RefitError):
    """Stored bytes do not match their recorded sha256: the object is refused, never loaded."""

    status = HTTPStatus.CONFLICT
    code = "integrity_error"


class WeightsUnavailableError(RefitError):
    """Pretrained weights are not available offline (e.g. torch hub cache not populated)."""

    status = HTTPStatus.FAILED_DEPENDENCY
    code = "weights_unavailable"


class StorageError(RefitError):
    """The object store failed or cannot be reached."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "storage_unavailable"


class ResourceError(RefitError):
    """The cluster cannot provide what a job asks for (workers, GPUs)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "insufficient_resources"


class TooManyJobsError(RefitError):
    """The job queue is full (``REFIT_TRAINING__MAX_QUEUED_JOBS``): retry later."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "too_many_jobs"


class TrainingError(RefitError):
    """A training run failed after it started (not the client's fault)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "training_failed"
