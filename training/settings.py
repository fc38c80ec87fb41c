"""Refit's one settings object (pydantic-settings, ``REFIT_`` prefix, nested with ``__``).

Example: ``REFIT_S3__BUCKET=models`` sets ``settings.s3.bucket``. Kubernetes manifests and the
README use exactly these names.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

NumericMode = Literal["fp32", "channels_last", "fp32_jit", "bf16", "bf16_jit"]
"""How a classifier replica runs a model. fp32: eager, contiguous. channels_last: fp32 in
NHWC. fp32_jit: channels_last, traced and frozen (batch norm folded into the convolutions).
bf16 / bf16_jit: the same under bf16 autocast."""


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

    def resolved_endpoint(self) -> str | None:
        """The endpoint after the ``AWS_ENDPOINT_URL`` fallback."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_access_key(self) -> str | None:
        """The access key after the ``AWS_ACCESS_KEY_ID`` fallback."""
        return self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or None

    def resolved_secret_key(self) -> str | None:
        """The secret key after the ``AWS_SECRET_ACCESS_KEY`` fallback."""
        return self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None


class StoreSettings(BaseModel):
    """The embedded SeaweedFS server (``refit store up``, the demo, the tests)."""

    data_dir: Path = Path(".refit")
    """Where SeaweedFS keeps its data and ``connection.json`` is written."""
    s3_port: int = Field(default=8333, ge=0, le=65535)
    """S3 port on 127.0.0.1; 0 picks a free port."""
    stop_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds to wait after SIGTERM before SIGKILL (SeaweedFS takes about 15 s)."""
    start_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for the S3 endpoint to answer."""


class RaySettings(BaseModel):
    """How Refit reaches Ray."""

    address: str | None = None
    """Ray address (``auto`` or ``ray://``-less GCS address). Unset: start a local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of a locally started Ray; unset means the machine's count."""
    include_dashboard: bool = False
    """The dashboard is off by default: its port must never be exposed (CVE-2023-48022)."""


class TrainingSettings(BaseModel):
    """Limits and defaults for fine-tune jobs."""

    max_epochs: int = Field(default=200, ge=1)
    """Upper bound on ``epochs`` in a spec."""
    max_batch_size: int = Field(default=1024, ge=1)
    """Upper bound on ``batch_size`` in a spec."""
    max_workers: int = Field(default=64, ge=1)
    """Upper bound on ``workers`` in a spec (the cluster's size is checked too)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs each Ray Train worker reserves."""
    max_failures: int = Field(default=2, ge=1)
    """Worker failures a run survives (resuming from its last checkpoint)."""
    max_corrupt_fraction: float = Field(default=0.2, ge=0, le=1)
    """Fraction of unreadable images above which a job fails."""
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    """Images larger than this are skipped as corrupt."""
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Images with more pixels than this are skipped (decompression bombs)."""
    min_accuracy: float = Field(default=0.0, ge=0, le=1)
    """Default gate: minimum top-1 on the validation split to publish."""
    max_regression: float = Field(default=0.01, ge=0, le=1)
    """Default gate: how much worse than the serving model (top-1) a candidate may be."""
    allow_weight_download: bool = False
    """Let torchvision download missing pretrained weights into the torch hub cache."""
    local_weights_dir: Path | None = None
    """The only directory ``file://`` weight URIs may point into; unset refuses them."""
    cache_mb: int = Field(default=512, ge=0)
    """Encoded image bytes each training worker keeps in memory across epochs (0: none)."""
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per training worker (0: decode in the training process)."""
    max_running_jobs: int = Field(default=2, ge=1)
    """Fine-tune jobs running at once over the cluster (one per model at most); more queue."""
    max_queued_jobs: int = Field(default=32, ge=0)
    """Jobs waiting for a slot; a create beyond this gets 429 with Retry-After."""
    progress_interval_s: float = Field(default=2.0, gt=0)
    """How often a running job's rank 0 writes step progress to its job record."""
    check_cluster_resources: bool = True
    """Refuse a job the cluster cannot host now; false on autoscaling clusters (KubeRay),
    where the workers appear on demand."""
    launcher: Literal["ray", "rayjob"] = "ray"
    """Where jobs run: ``ray``, a task on this Ray cluster; ``rayjob``, a KubeRay RayJob each
    (an isolated cluster, created through the Kubernetes API)."""
    rayjob_image: str = "ghcr.io/refit-ml/refit:0.1.0-gpu"
    """Image of the RayJob clusters (``launcher=rayjob``)."""
    rayjob_namespace: str | None = None
    """Namespace of the RayJobs; unset: the pod's own."""
    rayjob_worker_memory: str = "32Gi"
    """Memory of each RayJob training worker (a Kubernetes quantity)."""
    rayjob_deadline_s: int = Field(default=24 * 3600, ge=60)
    """A RayJob running longer than this is stopped by KubeRay (``activeDeadlineSeconds``)."""


class ServeSettings(BaseModel):
    """The HTTP service: limits, batching, replicas, hot-load, tokens."""

    host: str = "127.0.0.1"
    """Address the Serve HTTP proxy binds (0.0.0.0 inside a container)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """HTTP port of the Serve proxy."""
    admin_token: SecretStr | None = None
    """Bearer token for admin endpoints (jobs, promote, rollback); unset disables them."""
    predict_token: SecretStr | None = None
    """Bearer token for predict endpoints; unset leaves them open (admin token also works)."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    """Request bodies above this get 413 before any parsing."""
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    """One encoded image above this gets 413."""
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Images with more pixels get 413, checked before decoding (decompression bombs)."""
    max_images: int = Field(default=64, ge=1)
    """Images in one request."""
    max_top_k: int = Field(default=20, ge=1)
    """Largest top_k a client may ask for."""
    max_batch_size: int = Field(default=16, ge=1)
    """Dynamic batching: most requests merged into one forward pass."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    """Dynamic batching: longest wait for a batch to fill. Requests that arrive while a
    forward pass runs merge into the next one anyway, so a wait only delays lone requests."""
    classifier_replicas: int = Field(default=1, ge=1)
    """Replicas of the classifier deployment."""
    classifier_cpus: float = Field(default=1.0, gt=0)
    """CPUs each classifier replica reserves (torch uses as many threads)."""
    ingress_replicas: int = Field(default=1, ge=1)
    """Replicas of the FastAPI ingress deployment."""
    ingress_cpus: float = Field(default=0.25, gt=0)
    """CPUs each ingress replica reserves."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests one replica works on at once (Serve's default of 5 caps batches at 5)."""
    max_queued_requests: int = Field(default=256, ge=-1)
    """Requests waiting per caller before 503 with Retry-After (-1: unbounded)."""
    models_per_replica: int = Field(default=4, ge=1)
    """LRU of model names one classifier replica holds."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often replicas check the alias for a new version (hot-load)."""
    alias: str = "production"
    """The alias replicas serve and follow."""
    numeric_mode: NumericMode = "fp32"
    """fp32, channels_last, fp32_jit (channels_last, traced and frozen), bf16 or bf16_jit
    (autocast). A mode other than fp32 is used only where, checked at load time, it keeps
    >= 99 % top-1 agreement with fp32 and runs faster than fp32 on this CPU."""


class RefitSettings(BaseSettings):
    """All of Refit's settings. Environment: ``REFIT_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="REFIT_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    s3: S3Settings = S3Settings()
    """Object store."""
    store: StoreSettings = StoreSettings()
    """Embedded SeaweedFS."""
    ray: RaySettings = RaySettings()
    """Ray connection."""
    training: TrainingSettings = TrainingSettings()
    """Fine-tune limits and defaults."""
    serve: ServeSettings = ServeSettings()
    """The HTTP service."""
    url: str | None = None
    """CLI client: the service's URL (else ``url`` in ``connection.json`` of ``--data-dir``)."""
    token: SecretStr | None = None
    """CLI client: bearer token (else the admin token in ``connection.json``)."""


def env_names() -> list[str]:
    """Every environment variable the settings read (the README table and the Kubernetes
    manifests are checked against this list)."""
    names = []
    for section, field in RefitSettings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [f"REFIT_{section.upper()}__{n.upper()}" for n in annotation.model_fields]
        else:
            names.append(f"REFIT_{section.upper()}")
    return names


@lru_cache(maxsize=1)
def get_settings() -> RefitSettings:
    """The process-wide settings, read once from the environment."""
    return RefitSettings()
