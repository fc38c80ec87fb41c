"""Where the object store is: the storage contract's settings section (``REFIT_S3__*``)."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field


class S3Settings(BaseModel):
    """Where the object store is. Unset credentials fall back to the usual AWS variables."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. ``http://127.0.0.1:8333``. Falls back to ``AWS_ENDPOINT_URL``."""
    access_key_id: str | None = None
    """Access key. Falls back to ``AWS_ACCESS_KEY_ID`` (and boto3's credential chain)."""
    secret_access_key: str | None = None
    """Secret key. Falls back to ``AWS_SECRET_ACCESS_KEY``."""
    region: str = "us-east-1"
    """Region name sent to the store (SeaweedFS and MinIO accept any)."""
    bucket: str = "refit"
    """The one bucket that holds datasets, runs, models, aliases and job records."""
    prefix: str = ""
    """Key prefix inside the bucket (no leading or trailing slash), e.g. ``team-a``."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Connect timeout of background and training store calls (loads, checkpoints, jobs)."""
    read_timeout_s: float = Field(default=60.0, gt=0)
    """Read timeout of background and training store calls (weights are large)."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts (with botocore's standard backoff) of background and training store calls."""
    request_connect_timeout_s: float = Field(default=1.0, gt=0)
    """Connect timeout of store calls made while an HTTP request waits (listing, metadata,
    promote, jobs): a store that does not answer costs the client a bounded 503."""
    request_read_timeout_s: float = Field(default=3.0, gt=0)
    """Read timeout of store calls made while an HTTP request waits."""
    request_max_attempts: int = Field(default=2, ge=1)
    """Attempts of store calls made while an HTTP request waits (their retry budget)."""

    def resolved_endpoint(self) -> str | None:
        """The endpoint after the ``AWS_ENDPOINT_URL`` fallback."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_access_key(self) -> str | None:
        """The access key after the ``AWS_ACCESS_KEY_ID`` fallback."""
        return self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None

    def resolved_secret_key(self) -> str | None:
        """The secret key after the ``AWS_SECRET_ACCESS_KEY`` fallback."""
        return self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None
