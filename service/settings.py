"""Refit's one settings object (pydantic-settings, ``REFIT_`` prefix, nested with ``__``).

Example: ``REFIT_S3__BUCKET=models`` sets ``settings.s3.bucket``. Each section is owned by the
package that uses it (``s3``: the storage contract; ``ray`` and ``training``: the training
library; ``store`` and ``serve``: this application); this object only composes them and is
read when :func:`get_settings` is first called, never at import. Kubernetes manifests and the
README use exactly these names.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.job_settings import RaySettings, TrainingSettings
from training.storage.captures import CapturePolicy
from training.storage.location import S3Settings

NumericMode = Literal[
    "auto", "fp32", "channels_last", "fp32_jit", "bf16", "bf16_jit", "openvino", "int8"
]
"""How a classifier replica runs a model. fp32: eager, contiguous. channels_last: fp32 in
NHWC. fp32_jit: channels_last, traced and frozen (batch norm folded into the convolutions).
bf16 / bf16_jit: the same under bf16 autocast."""


class CaptureSettings(CapturePolicy):
    """Capture of served predictions for labelling: the default policy of every model that
    has none stored (all off: nothing captured), and the writer's bounds."""

    queue_size: int = Field(default=256, ge=1)
    """Captures waiting to be stored, per replica; past it a capture is dropped and counted
    (``refit_captures_total{outcome="dropped"}``), never the prediction slowed."""
    refresh_s: float = Field(default=10.0, gt=0)
    """How often a replica re-reads a model's stored capture policy."""
    low_confidence_metric_below: float = Field(default=0.5, gt=0, le=1)
    """Top-1 score under which a served image counts as low-confidence in
    ``refit_predictions_total{confidence="low"}`` (the live low-confidence rate)."""
    feedback_val_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of labelled images in the feedback dataset's val split (by content hash: an
    image's split never changes)."""

    def policy(self) -> CapturePolicy:
        """The default policy alone (without the writer's bounds)."""
        return CapturePolicy.model_validate(
            self.model_dump(include=set(CapturePolicy.model_fields))
        )


class DriftSettings(BaseModel):
    """The input-drift score of every replica (``service.runtime.drift``)."""

    sample_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    """Share of served images whose penultimate features are measured against the version's
    reference (0: no drift score; each sample costs one trunk forward pass, off the request
    path, and in the traced and graph modes a copy of the weights is kept for it)."""
    window: int = Field(default=500, ge=10, le=100_000)
    """Sampled images per model and replica the score is taken over (the last ones)."""
    queue_size: int = Field(default=32, ge=1)
    """Samples waiting to be measured, per replica; past it a sample is dropped and counted
    (``refit_drift_samples_total{outcome="dropped"}``), never the prediction slowed."""
    flush_s: float = Field(default=10.0, gt=0)
    """How often a replica writes a changed window to the store (``drift/``)."""


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
    label_token: SecretStr | None = None
    """Bearer token of labelling clients: ``POST /v1/models/{model}/feedback`` and nothing
    else (the admin token also works); unset leaves feedback to the admin token."""
    metrics_token: SecretStr | None = None
    """Bearer token of the Prometheus scrape of ``/metrics`` (the admin token also works;
    with neither set, ``/metrics`` is disabled)."""
    max_import_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)
    """Largest body of an import (``POST /v1/models/{model}/versions``: weights and
    calibration images); 413 above it."""
    max_calibration_images: int = Field(default=1024, ge=0)
    """Most calibration images one import may carry."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    """Request bodies above this get 413 before any parsing."""
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    """Request headers above this size in all (names and values) get 431."""
    max_headers: int = Field(default=64, ge=8)
    """Requests with more header fields get 431."""
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    """One encoded image above this gets 413."""
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Images with more pixels get 413, checked before decoding (decompression bombs)."""
    max_image_side: int = Field(default=8192, ge=16)
    """Images with a longer side get 413, checked before decoding."""
    max_aspect_ratio: float = Field(default=20.0, ge=1)
    """Images longer than this many times their short side get 413 (a resize to the crop
    would otherwise blow a thin sliver up to millions of pixels)."""
    max_images: int = Field(default=64, ge=1)
    """Images in one request."""
    max_top_k: int = Field(default=20, ge=1)
    """Largest top_k a client may ask for."""
    max_fan_out: int = Field(default=16, ge=1)
    """Most models one ``POST /v1/variants/predict`` may ask (each is loaded in the replica
    that answers)."""
    max_batch_size: int = Field(default=16, ge=1)
    """Dynamic batching: most requests merged into one forward pass."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    """Dynamic batching: longest wait for a batch to fill. Requests that arrive while a
    forward pass runs merge into the next one anyway, so a wait only delays lone requests.
    0: requests go straight to the forward lane (Serve's batcher, and its cost per request,
    only run where a wait is set)."""
    decode_with_batch: bool = True
    """Decode a prediction's images with its batch, on one thread just before the batch's
    forward pass, instead of each request in a thread pool while other forwards run: on a
    replica of two cores, decoding beside the forward costs about a millisecond of CPU per
    image in the forward's own threads (``benchmarks/request_path.py``). Off: decoding runs
    in parallel, for replicas with many more cores than the forward uses."""
    classifier_replicas: int = Field(default=1, ge=1)
    """Replicas of the serving deployment (with autoscaling: the fewest). One replica with
    every core measured fastest on one machine, in every numeric mode, and smallest (see the
    README's serving figures); more replicas spread over nodes."""
    classifier_max_replicas: int | None = Field(default=None, ge=1)
    """Serve autoscaling of the classifier, on ongoing requests: from ``classifier_replicas``
    up to this many replicas. Unset: a fixed ``classifier_replicas``."""
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    """Autoscaling: ongoing requests per classifier replica Serve aims for."""
    upscale_delay_s: float = Field(default=5.0, ge=0)
    """Autoscaling: how long load stays above target before a replica is added."""
    downscale_delay_s: float = Field(default=60.0, ge=0)
    """Autoscaling: how long load stays below target before a replica is removed."""
    classifier_cpus: float | None = Field(default=None, gt=0)
    """CPUs each serving replica reserves (torch or OpenVINO uses as many threads, at least
    one). Unset: the cores of the machine that builds the app (at most 8)."""
    start_job_runner: bool = True
    """Replicas start the job runner actor when they start, so queued jobs resume without
    waiting for a request. ``false`` for serving-only runs: the runner (about 0.5 GiB: it
    imports torch to validate specs) then starts with the first job request."""
    jemalloc: bool = True
    """``refit up`` restarts itself with jemalloc preloaded where it is installed (Debian
    ``libjemalloc2``; ``make setup`` installs it as root): every Ray process it starts
    inherits it, and glibc malloc costs about a fifth of CPU inference throughput."""
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    """What answers HTTP on ``host:port``. ``haproxy``: Ray Serve's high-throughput ingress
    (Ray's ``RAY_SERVE_ENABLE_HA_PROXY`` and ``RAY_SERVE_THROUGHPUT_OPTIMIZED``): HAProxy
    hands each request to a classifier replica's own HTTP server (ports from 30000 up), so no
    Python proxy and no Ray call sit in a prediction's path (1.2-1.3x the throughput of
    ``proxy`` here, benchmarks/serving.py). ``proxy``: Serve's Python HTTP proxy, which hands
    requests to replicas by Ray calls. Set on the Serve that Refit starts; on KubeRay the pods
    set Ray's variables too."""
    ingress_drain_s: float = Field(default=2.0, ge=0)
    """With the ``haproxy`` ingress: how long a stopping replica keeps answering after HAProxy
    stops sending it requests (Ray's ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``: 30 s
    by default, sized for remote load balancers; HAProxy is told at once)."""
    ingress_stats_host: str = Field(default="127.0.0.1", pattern=r"^$|^[0-9A-Za-z.:\[\]-]{1,253}$")
    """With the ``haproxy`` ingress: the address HAProxy's stats page and Prometheus exporter
    listen on (their ports are chosen free at start); empty: neither listens. Ray binds them
    to every interface without auth; ``refit-haproxy`` (service/haproxy_guard.py) narrows
    Ray's config to this address, and its admin socket to mode 600 in a 0700 directory."""
    proxy_health_check_period_s: float = Field(default=2.0, gt=0)
    """How often Serve's controller checks each HTTP proxy (Ray's
    ``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S``, 10 s by default); a proxy is replaced after 3
    failed checks, so this sets how long a killed proxy stays dead. Set on the Serve that
    Refit starts; on KubeRay the pods set the variable."""
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    """Most replicas of one deployment on one Ray node (unset: no limit). 1 with 2+ replicas
    spreads them over nodes, so every serving node runs a Serve proxy and one node's loss (or
    its proxy's) leaves the others answering."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests one replica works on at once (Serve's default of 5 caps batches at 5)."""
    max_queued_requests: int = Field(default=256, ge=-1)
    """Requests waiting per caller before 503 with Retry-After (-1: unbounded)."""
    models_per_replica: int = Field(default=64, ge=1)
    """Model names one classifier replica follows (an LRU; Serve's multiplexing limit): a
    name costs little once its version is parked (``model_cache_mb`` bounds the memory)."""
    model_cache_mb: int = Field(default=1024, ge=1)
    """Memory of the model versions one classifier replica keeps loaded, together (a stage
    several variants share counted once; a trace's or graph's copy of the weights counted):
    past it the least recently used models are parked and load again on their next request.
    The model used last always stays loaded."""
    stage_cache_mb: int = Field(default=256, ge=0)
    """Verified weight files (stage by stage) a replica keeps in memory: a new version that
    shares stages with one it loaded before (a head-only retrain: all but the head) reads
    only the others from the store (0: every hot-load reads every stage)."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often replicas check the alias for a new version (hot-load)."""
    alias: str = "production"
    """The alias replicas serve and follow."""

    @property
    def replica_cpus(self) -> float:
        """CPUs a serving replica reserves: ``classifier_cpus``, or this machine's cores
        (its CPU affinity, at most 8). Read when the app is built."""
        if self.classifier_cpus is not None:
            return self.classifier_cpus
        return float(max(1, min(len(os.sched_getaffinity(0)), 8)))

    @property
    def torch_threads(self) -> int:
        """Torch threads per serving replica: its whole reserved CPUs, at least one."""
        return max(1, int(self.replica_cpus))

    numeric_mode: NumericMode = "auto"
    """``auto`` (the default): per version, the fastest mode on this CPU that keeps the
    agreement below, among fp32, fp32_jit, bf16_jit and the graphs the version has (timed
    once per architecture and replica; the graphs come after publishing, and the version
    switches to them when they verify). Or one mode: fp32, channels_last, fp32_jit
    (channels_last, traced and frozen), bf16 or bf16_jit (autocast), openvino (OpenVINO
    runtime, fp32) or int8 (OpenVINO, NNCF post-training quantization); the last two run
    graphs made at publish time and stored with the version. A mode other than fp32 is used
    only where it keeps >= 99 % top-1 agreement with fp32 on the version's calibration images
    and runs faster than fp32 on this CPU (checked at load time); else fp32 serves and the
    reason is exported."""


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
    capture: CaptureSettings = CaptureSettings()
    """Capture of served predictions (default policy: off)."""
    drift: DriftSettings = DriftSettings()
    """The input-drift score of live requests."""
    url: str | None = None
    """CLI client: the service's URL (else ``url`` in ``connection.json`` of ``--data-dir``)."""
    token: SecretStr | None = None
    """CLI client: bearer token (else the admin token in ``connection.json``)."""

    @model_validator(mode="after")
    def _graphs_the_serving_mode_runs(self) -> RefitSettings:
        # A job makes only the graphs the configured serving mode runs (seconds of a small
        # job's publish each), unless REFIT_TRAINING__EXPORT_GRAPHS names them itself.
        if "export_graphs" not in self.training.model_fields_set:
            mode = self.serve.numeric_mode
            graphs: tuple[Literal["openvino", "int8"], ...] = ()
            if mode == "auto":  # it weighs every graph against the torch modes
                graphs = ("openvino", "int8")
            elif mode in ("openvino", "int8"):
                graphs = (mode,)
            training = self.training.model_copy(update={"export_graphs": graphs})
            training.model_fields_set.discard("export_graphs")  # still derived, not chosen
            object.__setattr__(self, "training", training)  # frozen: set once, here
        return self


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
