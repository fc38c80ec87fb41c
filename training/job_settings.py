"""The training library's settings sections: Ray (``REFIT_RAY__*``) and fine-tune limits
(``REFIT_TRAINING__*``). The one settings object that reads them from the environment is
:class:`service.settings.RefitSettings`; training code receives only these sections (and
:class:`training.storage.S3Settings`), never the service's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class RaySettings(BaseModel):
    """How Refit reaches Ray."""

    address: str | None = None
    """Ray address (``auto`` or ``ray://``-less GCS address). Unset: start a new local Ray,
    even when ``RAY_ADDRESS`` names another; once connected, Refit sets ``RAY_ADDRESS`` to its
    cluster for everything it starts (Ray Train's helpers included), so nothing finds a
    cluster by discovery."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of a locally started Ray; unset means the machine's count."""
    include_dashboard: bool = False
    """The dashboard is off by default: its port must never be exposed (CVE-2023-48022)."""
    log_to_driver: bool = True
    """Output of Ray's worker processes (prints, logs) copied to the console of the process
    that started Ray. ``refit up`` turns it off: its console shows the service, the demo and
    each job, and Ray's output stays in Ray's session logs (linked from ``{data_dir}/logs``)."""


class TrainingSettings(BaseModel):
    """Limits and defaults for fine-tune jobs."""

    max_epochs: int = Field(default=200, ge=1)
    """Upper bound on ``epochs`` in a spec."""
    echo_progress: bool = True
    """Each epoch's line (loss, top-1, throughput, ETA) printed by the process that trains
    (the job's log). ``refit up`` turns it off for the demo it trains itself: its console
    prints every job's epochs from the job records instead, once."""
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
    image_cache_mb: int = Field(default=2048, ge=0)
    """Image bytes kept on each node's disk between jobs (``training.image_cache``): a retrain
    reads the images its last run fetched from disk, verified against their ETags, and
    fetches only new or changed ones (0: off, every job fetches every image)."""
    stage_cache_mb: int = Field(default=256, ge=0)
    """Verified weight files (stage by stage) a job process keeps in memory: the version it
    publishes is checked before its alias moves without reading again the stages it read
    (its base's) or wrote (0: every stage read again)."""
    image_cache_dir: Path | None = None
    """Where the node's image cache lives; unset: ``refit-image-cache-{uid}`` in the system's
    temporary directory. It must be this user's alone (0700), else it is not used."""
    feature_store_mb: int = Field(default=256, ge=0)
    """Head-only runs keep their images' penultimate features on the store per trunk and
    image content (``features/``), so a retrain computes only new images' features; every
    published version's logits on its validation images are kept the same way, so a retrain
    runs the serving version only on validation images it has not seen. This bounds what one
    run reads of them (0: off, every feature and logit computed)."""
    drift_fit_images: int = Field(default=256, ge=0, le=100_000)
    """Training images (spread over the classes) a version's drift reference is fitted on
    (one extra forward pass over them at publish); its threshold is measured on the
    validation split, held out. Below ten (0: off), it is fitted and measured on disjoint
    parts of the validation split."""
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per training worker (0: decode in the training process)."""
    export_graphs: tuple[Literal["openvino", "int8"], ...] = ("openvino", "int8")
    """Graphs made at publish time for the accelerated serving modes: OpenVINO IR (fp32) and
    its INT8 post-training quantization (NNCF) on the calibration crops. Empty: none (those
    modes then fall back to fp32). Unset, the service's settings derive it from the serving
    mode (``RefitSettings``: only the graph that mode runs). An export that fails is logged;
    the version publishes without it."""
    quantize_images: int = Field(default=256, ge=1)
    """Validation crops that INT8 is calibrated on and both graphs' agreement with fp32 is
    measured on (a quarter of the validation split at least stays held out, for a second
    agreement figure)."""
    int8_min_agreement: float = Field(default=0.995, ge=0, le=1)
    """INT8 keeps at least this top-1 agreement with fp32 on its calibration crops: where
    plain post-training quantization misses it, NNCF's accuracy control returns the layers
    that cost most agreement to floating point until it holds (the version's graph record
    names them). A margin over the replicas' 0.99 gate, which they check again on their own
    CPU. 0: plain quantization only."""
    max_running_jobs: int = Field(default=2, ge=1)
    """Fine-tune jobs running at once over the cluster (one per model at most); more queue."""
    job_lease_s: float = Field(default=60.0, gt=0)
    """How long a job's owner holds it without renewing (renewed every quarter of it); a
    runner takes over a running job only after its owner's lease ran out."""
    max_queued_jobs: int = Field(default=32, ge=0)
    """Jobs waiting for a slot; a create beyond this gets 429 with Retry-After."""
    policy_check_s: float = Field(default=2.0, ge=0.2)
    """How often the job runner evaluates the retrain policies (a firing waits this long at
    most before its job is queued)."""
    checkpoint_interval_s: float = Field(default=60.0, ge=0)
    """A run checkpoints after an epoch that ends this long after its last checkpoint (0:
    after every epoch), and a Ray Train run after its last epoch: a failure repeats at most
    this much training, and a small job stores at most one checkpoint, not one per epoch.
    Each checkpoint carries the best epoch's weights."""
    legacy_job_path: bool = False
    """Run every job the way Refit did before in-process jobs: Ray Train even for one worker,
    and a checkpoint after every epoch (benchmarks measure both paths in one run)."""
    progress_interval_s: float = Field(default=2.0, gt=0)
    """How often a running job's rank 0 writes step progress to its job record."""
    check_cluster_resources: bool = True
    """Refuse a job the cluster cannot host now; false on autoscaling clusters (KubeRay),
    where the workers appear on demand."""
    warm_job_processes: int = Field(default=1, ge=0, le=16)
    """Job processes kept started ahead of the next jobs (``launcher=ray``; topped up while no
    job runs): their Python and the training imports are ready when a job comes, seconds of a
    small job's fixed cost (about 300 MB of memory each while it waits). Set it to
    ``max_running_jobs`` where jobs come in bursts; 0: none."""
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
