"""A fine-tune job from spec to published version: the driver side.

:func:`run_finetune` moves the job's record and calls the pipeline, whose steps are::

    prepare (index the data, resolve the base)  ->  train (Ray Train, ray_train.fit)
    ->  score the best checkpoint on the validation split
    ->  score the alias' current version on the same split  ->  gate
    ->  publish (weights, then manifest)  ->  move the alias

A failed job publishes nothing; the outcome is recorded in the job record either way. The
module is the pipeline's steps in the order they run (a little over 300 lines).
"""

from __future__ import annotations

import contextvars
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbones import build_with_weights, head_module, trunk
from training.data import DatasetIndex, Sample, index_dataset, shared_cache, shared_image_bytes
from training.feature_stats import FILE as FEATURES_FILE
from training.feature_stats import MIN_IMAGES, FeatureStats, collect_outputs
from training.feature_store import FeatureStore, trunk_id
from training.freeze_spec import HeadOnly
from training.gate import GateDecision, SourceScore, class_drops, decide, with_sources
from training.image_cache import DiskImageCache
from training.job_settings import TrainingSettings
from training.node_jobs import Critical
from training.openvino_ir import ExportChild
from training.preprocessing_spec import Preprocessing
from training.ray_train import fit
from training.run_context import RunInputs, ValOutputs
from training.scoring import Scores, outputs_on, score_features, score_logits, score_parts
from training.served_scores import ServedOutputs, content_shas
from training.spec import FinetuneSpec
from training.stage_digests import split_stages, stage_digests
from training.storage.errors import (
    DataError,
    NotFoundError,
    RefitError,
    TrainingError,
)
from training.storage.job_lease import JobCancelledError, JobLease, LeaseLostError, new_owner
from training.storage.jobs import JobState, JobStore
from training.storage.location import S3Settings
from training.storage.registry import Manifest, Registry, WeightsUpload
from training.storage.s3 import ObjectStore
from training.storage.stage_files import StageTensors, process_stage_cache
from training.version_crops import (
    calibration_crops,
    publish_graphs,
    spread,
    store_graph_set,
)
from training.weights import ResolvedBase, resolve_base

log = logging.getLogger(__name__)


def run_finetune(
    spec: FinetuneSpec,
    *,
    s3: S3Settings,
    training: TrainingSettings,
    job_id: str | None = None,
    owner: str | None = None,
    on_published: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one job to the end; returns the JSON-ready result. Raises RefitError subclasses
    for bad specs and data; in that case nothing is published and no alias moves.

    With ``job_id`` the job's record (created by the API) is run; without, a record is created
    first. The run holds the record's lease as ``owner`` (the token a runner or RayJob was
    given; unset, a new one for this process) and renews it while it runs: a job another live
    owner runs is a ConflictError, and a run that lost its lease publishes nothing and leaves
    the record to the owner that took over. The outcome - published, rejected by the gate
    (state succeeded, with the gate's reasons), or failed (with the error) - is recorded in
    ``jobs/{job_id}.json`` either way.

    ``on_published(model)``: tells the replicas that the model's alias moved (the runner's job
    process passes the notice; elsewhere replicas poll). Graphs for accelerated serving modes
    are made after the alias moved, unless ``legacy_job_path``: the version goes live in fp32
    first and the replicas switch once its graph set is stored (a second call).
    """
    store = ObjectStore(s3)
    jobs = JobStore(store)
    if job_id is None or not store.exists(jobs.key(job_id)):
        job_id = jobs.create(spec, job_id=job_id)[0].job_id
    lease = JobLease(jobs, job_id, owner or new_owner("local"), training.job_lease_s)
    lease.acquire()
    with lease.heartbeat():
        try:
            result = _Pipeline(spec, store, training, job_id, lease.check, on_published).run()
        except LeaseLostError:
            log.warning("job %s: lease lost; its new owner records the end", job_id)
            raise
        except JobCancelledError as exc:
            _finish(lease, "cancelled", reason=f"cancelled on request: {exc}")
            raise
        except RefitError as exc:
            _finish(lease, "failed", reason=str(exc), error=exc.to_dict()["error"])
            raise
        except Exception as exc:
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            _finish(lease, "failed", reason=error["message"], error=error)
            raise
        _finish(lease, "succeeded", reason=_outcome(result), result=result)
    return result


def _outcome(result: dict[str, Any]) -> str:
    if result["published"]:
        moved = f" and moved {result['alias']}" if result["promoted"] else ""
        return f"published {result['version']}{moved}"
    return "not published: " + "; ".join(result["gate"].get("reasons") or ["gate failed"])


def _finish(lease: JobLease, state: JobState, **fields: Any) -> None:
    try:
        if lease.finish(state, **fields) is None:
            log.warning("job %s changed owner; its end is not recorded here", lease.job_id)
    except RefitError as exc:  # the outcome itself matters more than its record
        log.warning("could not record the end of %s: %s", lease.job_id, exc)


@dataclass
class _Trained:
    """The best checkpoint of the run, loaded, and what the run reported."""

    model: nn.Module
    skipped: set[str]
    metrics: dict[str, Any]
    best_metrics: dict[str, Any]
    storage_uri: str
    val_outputs: ValOutputs | None = None


@dataclass(frozen=True)
class _Candidate:
    """What the job trained, and what it is scored, published and exported with."""

    trained: _Trained
    index: DatasetIndex
    base: ResolvedBase
    preprocessing: Preprocessing
    val: list[Sample]
    """The readable validation images."""


class _Phases:
    """Seconds of each step of the job, for its result: where a job's fixed cost goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.details: dict[str, float] = {}
        """Parts of phases, not added to the whole (the worker's set-up, by part)."""
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Close the step that just ended."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now

    def added_up(self, run: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The job's ``seconds`` and ``phases`` that add up to them: training split into its
        parts (Ray Train's start and stop, worker set-up, this attempt's epochs, checkpoints,
        the rest), and ``other_s`` what no step claims (the result itself);
        ``phase_details`` holds parts of phases (Ray Train's processes and worker boot) and
        the epochs of every attempt (``all_attempts_epochs_s``)."""
        phases = dict(self.seconds)
        parts = ("ray_processes_s", "ray_worker_boot_s")  # of ray_start_s
        details: dict[str, float] = {k: phases.pop(k) for k in parts if k in phases}
        details.update(self.details)
        phases["epochs_s"] = float(run.get("attempt_epochs_s", run.get("epochs_s", 0.0)))
        train = phases.pop("train_s", None)
        if train is not None:
            inner = ("ray_start_s", "worker_setup_s", "epochs_s", "checkpoints_s", "ray_stop_s")
            phases["train_other_s"] = round(train - sum(phases.get(k, 0.0) for k in inner), 3)
        phases["other_s"] = round(seconds - sum(phases.values()), 3)
        details["all_attempts_epochs_s"] = float(run.get("epochs_s", 0.0))
        return {"seconds": round(seconds, 3), "phases": phases, "phase_details": details}

    def split_training(self, called: float, returned: float, timing: Any) -> None:
        """Where the Ray Train run's time went, from rank 0's own timing: ``ray_start_s``
        (trainer, controller and worker processes up, process group; of it
        ``ray_processes_s`` until rank 0's process existed, ``ray_worker_boot_s`` from there
        to its training function), ``worker_setup_s`` (model, data scan, loaders),
        ``checkpoints_s`` (each epoch's checkpoint saved, and what of its upload training
        waited for), ``ray_stop_s`` (the last uploads, workers down, the best checkpoint's
        weights downloaded)."""
        if not isinstance(timing, dict):  # a run resumed by Ray Train reports the last try
            return
        self.seconds["ray_start_s"] = round(float(timing["started_at"]) - called, 3)
        if "process_started_at" in timing:
            process = float(timing["process_started_at"])
            self.seconds["ray_processes_s"] = round(process - called, 3)
            self.seconds["ray_worker_boot_s"] = round(float(timing["entered_at"]) - process, 3)
        self.seconds["worker_setup_s"] = float(timing["setup_s"])
        self.details.update(timing.get("setup_parts") or {})  # model, features, scan, loaders
        self.seconds["checkpoints_s"] = float(timing["checkpoints_s"])
        self.seconds["ray_stop_s"] = round(returned - float(timing["ended_at"]), 3)


class _ExportAhead:
    """The graphs' export process (:class:`ExportChild`), started once the job's workers
    train (rank 0's first step report is on the store): its imports then use the CPU that
    training leaves, not the CPU that the start of Ray Train's processes needs."""

    def __init__(self, store: ObjectStore, job_id: str) -> None:
        self._child: ExportChild | None = None
        self._taken = threading.Event()
        self._thread = threading.Thread(
            target=self._start_when_training,
            args=(store, JobStore.step_key(job_id)),
            daemon=True,
            name="export-ahead",
        )
        self._thread.start()

    def _start_when_training(self, store: ObjectStore, key: str) -> None:
        while not self._taken.wait(0.5):
            try:
                if store.exists(key):
                    self._child = ExportChild()
                    return
            except RefitError:  # a flaky store: look again
                continue

    def take(self) -> ExportChild | None:
        """The started process, now the caller's (None: not started; the export starts
        one)."""
        self._taken.set()
        self._thread.join()
        child, self._child = self._child, None
        return child

    def close(self) -> None:
        """End the process if nobody took it."""
        child = self.take()
        if child is not None:
            child.close()


class _WeightsAhead:
    """The candidate's weights written while it is scored and gated: the store's write, the
    slowest part of publishing, overlaps that CPU work. Removed again unless published."""

    def __init__(self, registry: Registry, model: str, stages: list[StageTensors]) -> None:
        self.registry = registry
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="refit-weights")
        self._upload = self._pool.submit(registry.upload_weights, model, stages)
        self._kept = False

    def take(self) -> WeightsUpload:
        """The written weights (the write's error, if it failed)."""
        return self._upload.result()

    def keep(self) -> None:
        """The version was published: its weights stay."""
        self._kept = True

    def close(self) -> None:
        """Remove the weights unless their version was published (best effort)."""
        try:
            if not self._kept:
                self.registry.discard(self._upload.result())
        except RefitError as exc:
            log.warning("weights written ahead of a version not published stay: %s", exc)
        finally:
            self._pool.shutdown(wait=False)


@dataclass
class _Incumbent:
    version: str | None = None
    scores: Scores | None = None
    forwarded: int | None = None
    """Validation images the serving version ran on (the rest: its stored logits)."""
    note: str | None = None


class _Pipeline:
    """The steps of one job, in order (see the module docstring)."""

    def __init__(
        self,
        spec: FinetuneSpec,
        store: ObjectStore,
        training: TrainingSettings,
        job_id: str,
        still_owner: Callable[[], None],
        on_published: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.store, self.training, self.job_id = spec, store, training, job_id
        self.on_published = on_published or (lambda model: None)
        # graphs after the version is live (legacy: before it is published)
        self.graphs_after = bool(training.export_graphs) and not training.legacy_job_path
        # raises unless this run still holds the job: checked before steps nobody may repeat
        self.still_owner = still_owner
        self.registry = Registry(store, cache=process_stage_cache(training.stage_cache_mb))
        self.started = time.time()
        self.phases = _Phases()
        # the serving version's logits on images it was run on (not on the legacy path)
        self.outputs = ServedOutputs(store, training, enabled=not training.legacy_job_path)
        self.weights_ahead: _WeightsAhead | None = None

    def run(self) -> dict[str, Any]:
        ahead = _ExportAhead(self.store, self.job_id) if self.training.export_graphs else None
        # on this node's critical path until the version is live: earlier jobs' graph
        # exports stop meanwhile (training.node_jobs)
        self.critical = Critical()
        try:
            # one byte cache for every pass of this process over the job's images
            disk = DiskImageCache.for_store(
                self.store, self.training.image_cache_dir, self.training.image_cache_mb
            )
            with shared_image_bytes(self.training.cache_mb * 1024 * 1024, disk):
                return self._run(ahead)
        finally:
            self.critical.release()
            if ahead is not None:  # unused when the gate refused the candidate or a step failed
                ahead.close()
            if self.weights_ahead is not None:
                self.weights_ahead.close()

    def _run(self, ahead: _ExportAhead | None) -> dict[str, Any]:
        spec, lap = self.spec, self.phases.lap
        with ThreadPoolExecutor(1, thread_name_prefix="refit-base") as pool:
            # the base's weights are read while the dataset is listed: both mostly wait on
            # the store (~0.3 s each for the loop's retrain); the index's error comes first
            base_ahead = pool.submit(
                contextvars.copy_context().run,
                resolve_base,
                spec.base,
                store=self.store,
                training=self.training,
                registry=self.registry,
            )
            index = index_dataset(
                self.store, spec.dataset, val_fraction=spec.val_fraction, seed=spec.seed
            )
            cache = shared_cache()
            if cache is not None and cache.disk is not None:  # what the node's disk holds
                cache.know(self.store, [s.key for s in index.train + index.val])
            lap("index_s")
            base = base_ahead.result()
        preprocessing = spec.preprocess or base.preprocessing
        lap("resolve_base_s")  # the wait for the base after the index
        trained = self.train(index, base, preprocessing)
        lap("train_s")
        self.still_owner()
        if not self.training.legacy_job_path:  # written while the candidate is scored
            stages = split_stages(trained.model.state_dict(), base.backbone, len(index.classes))
            self.weights_ahead = _WeightsAhead(self.registry, spec.model, stages)
        val = [s for s in index.val if s.key not in trained.skipped]
        stored = self.stored_features(trained.model, base.backbone, preprocessing, val)
        kept = trained.val_outputs
        if not stored and kept is not None and kept.keys == [s.key for s in val]:
            # the best epoch's validation pass: the same weights on the same images, in fp32
            scored_on = "validation pass"
            scores = score_logits(val, kept.logits, index.classes)
            features = [(kept.features, kept.logits.argmax(dim=1))]
        else:
            scored_on = "stored features" if stored else "images"
            with collect_outputs(trained.model, base.backbone) as seen:
                scores = (
                    score_features(
                        head_module(trained.model, base.backbone), val, stored[1], index.classes
                    )
                    if stored
                    else self.score(trained.model, val, preprocessing, index.classes)
                )
            features = [(f, logits.argmax(dim=1)) for f, logits in seen]
        lap("score_s")
        train = [s for s in index.train if s.key not in trained.skipped]
        reference = self.drift_reference(
            trained.model, base.backbone, preprocessing, index, train, features
        )
        lap("reference_s")
        incumbent = self.incumbent(val, index.classes, preprocessing, base, stored)
        lap("score_serving_s")
        gate = self.gate(scores, incumbent)
        candidate = scores.all
        metrics = {k: candidate[k] for k in ("loss", "top1", "top5", "macro_f1", "images")}
        metrics.update(per_class=candidate["per_class"], confusion=candidate["confusion"])
        if len(scores.parts) > 1 or "" not in scores.parts:
            metrics["sources"] = {
                name: {k: part[k] for k in ("top1", "top5", "macro_f1", "images")}
                for name, part in scores.parts.items()
            }
        version, promoted, graphs = None, False, []
        manifest: Manifest | None = None
        if gate.passed:
            self.still_owner()
            exporter = ahead.take() if ahead else None
            published = _Candidate(trained, index, base, preprocessing, val)
            manifest = self.publish(
                published, metrics, gate, reference, None if self.graphs_after else exporter
            )
            version = manifest.version
            lap("publish_s")
            if spec.promote:
                self.still_owner()
                self.registry.set_alias(spec.model, spec.alias, version)
                promoted = True
                self.on_published(spec.model)
            lap("alias_s")
            self.critical.release()  # live: what follows waits for no one
            if scored_on == "validation pass" and kept is not None:  # for the next retrain
                self.outputs.remember(
                    manifest.stages, base.backbone, preprocessing, val, kept.logits
                )
                lap("outputs_s")
            if self.graphs_after:
                graphs = self.add_graphs(manifest, published, exporter)
                lap("graphs_after_s")
                if graphs and promoted:
                    self.on_published(spec.model)  # replicas switch to the faster mode
            elif exporter is not None:
                exporter.close()
        result = self.result(trained, index, base, metrics, gate, version, promoted)
        result["graphs_after_publish"] = graphs
        if manifest is not None:  # what it wrote, what it shares with versions stored before
            result["weights"] = manifest.weights_storage()
        result["scored_on"] = scored_on
        result["serving_images_forwarded"] = incumbent.forwarded
        return result

    def graphs(
        self, c: _Candidate, exporter: ExportChild | None
    ) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The candidate's graphs (``training.export_graphs``) as files and records."""
        return publish_graphs(
            c.trained.model,
            c.base.backbone,
            len(c.index.classes),
            c.val,
            self.store,
            c.preprocessing,
            self.training,
            exporter,
        )

    def add_graphs(
        self, manifest: Manifest, c: _Candidate, exporter: ExportChild | None
    ) -> list[str]:
        """The version's graphs, made after it went live and stored as its graph set; the
        modes made (none when the export failed: the version serves fp32)."""
        files, records = self.graphs(c, exporter)
        return store_graph_set(self.registry, manifest, files, records)

    def train(
        self, index: DatasetIndex, base: ResolvedBase, preprocessing: Preprocessing
    ) -> _Trained:
        """Ray Train run; the best checkpoint's weights in a fresh model."""
        inputs = RunInputs(
            spec=self.spec,
            s3=self.store.settings,
            training=self.training,
            backbone=base.backbone,
            classes=index.classes,
            train=index.train,
            val=index.val,
            preprocessing=preprocessing,
            base_state=base.state_dict,
            keep_head=base.class_names == index.classes,
        )
        with tempfile.TemporaryDirectory(prefix="refit-") as work:
            called = time.time()
            result = fit(inputs, job_id=self.job_id, workdir=Path(work))
            self.phases.split_training(called, time.time(), result.metrics.get("timing"))
            if "data_error" in result.metrics:
                raise DataError(result.metrics["data_error"], field="dataset")
            if result.best_weights is None:
                raise TrainingError("training finished without a checkpoint")
            # the run's own copy of the best weights: the model holds them (no random init)
            model = build_with_weights(
                base.backbone, result.best_weights, num_classes=len(index.classes)
            )
            skipped = set(result.state.get("bad_keys", []))
        return _Trained(
            model,
            skipped,
            result.metrics,
            result.best_metrics,
            result.storage_uri,
            result.val_outputs,
        )

    def score(
        self, model: nn.Module, val: list[Sample], pre: Preprocessing, classes: list[str]
    ) -> Scores:
        """Metrics on the (readable) validation split, over all of it and per source."""
        return score_parts(model, val, self.store, pre, classes, self.training)

    def stored_features(
        self, model: nn.Module, backbone: str, pre: Preprocessing, val: list[Sample]
    ) -> tuple[str, dict[str, torch.Tensor]] | None:
        """The trunk id and the penultimate features (by key) of a head-only candidate on
        these images (the validation split, or the drift reference's training sample), from
        the feature store, where its run stored them in fp32; None (use the images) for
        other policies or when any is missing."""
        spec = self.spec
        head_only = isinstance(spec.freeze, HeadOnly) and spec.freeze.feature_cache
        if not head_only or not self.training.feature_store_mb or spec.bf16 or not val:
            return None
        kept = FeatureStore(self.store, max_bytes=self.training.feature_store_mb * 1024 * 1024)
        trunk_key = trunk_id(trunk(model, backbone), backbone, pre, bf16=False)
        sha_of = content_shas(self.store, val, pre, kept, self.training)
        if sha_of is None:  # an image gone meanwhile: the image path reports it
            return None
        shas = [sha_of[s.key] for s in val]
        found = kept.lookup(trunk_key, set(shas))
        if not found.keys() >= set(shas):
            return None
        return trunk_key, {s.key: found[sha] for s, sha in zip(val, shas, strict=True)}

    def drift_reference(
        self,
        model: nn.Module,
        backbone: str,
        pre: Preprocessing,
        index: DatasetIndex,
        train: list[Sample],
        val_features: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> FeatureStats | None:
        """The version's drift reference: fitted on the candidate's features of up to
        ``drift_fit_images`` training images (spread over the classes; a head-only
        candidate's from the feature store, the rest by a pass over the images), its
        threshold measured on the validation features of the scoring pass (held out from
        the fit); with too few training images, fitted and measured on disjoint parts of the
        validation split."""
        held = torch.cat([f for f, _ in val_features]) if val_features else None
        sample = spread(train, self.training.drift_fit_images)
        if held is None:
            return None
        if len(sample) < MIN_IMAGES:
            return FeatureStats.fit(held, torch.cat([p for _, p in val_features]))
        stored = self.stored_features(model, backbone, pre, sample)
        if stored is not None:  # a head-only candidate: its trunk's features are on the store
            features = torch.stack([stored[1][s.key] for s in sample])
            with torch.inference_mode():
                predicted = head_module(model, backbone)(features).argmax(dim=1)
            return FeatureStats.fit(features, predicted, held)
        features, logits = outputs_on(
            model,
            backbone,
            sample,
            store=self.store,
            preprocessing=pre,
            classes=index.classes,
            training=self.training,
        )
        return FeatureStats.fit(features, logits.argmax(dim=1), held)

    def incumbent(
        self,
        val: list[Sample],
        classes: list[str],
        pre: Preprocessing,
        base: ResolvedBase,
        stored: tuple[str, dict[str, torch.Tensor]] | None = None,
    ) -> _Incumbent:
        """The alias' current version scored on the same split (when it has the same
        classes): on the ``stored`` features when it has the candidate's trunk and
        preprocessing (a head-only retrain of it), else on the images. A retrain of the
        serving version (its ``base``) scores the weights loaded and verified as its base."""
        spec = self.spec
        record, _ = self.registry.get_alias(spec.model, spec.alias)
        if record is None:
            return _Incumbent()
        model_id, version = spec.model, record.version
        try:
            if base.state_dict is not None and base.parent == f"{model_id}@{version}":
                manifest, _ = self.registry.read_manifest(
                    model_id, version, expect_sha256=record.sha256
                )
                state = base.state_dict
            else:
                manifest, state = self.registry.load_version(
                    model_id, version, expect_sha256=record.sha256
                )
        except NotFoundError:
            return _Incumbent()
        if manifest.class_names != classes:
            return _Incumbent(note=f"serving {manifest.version} has other classes; not compared")
        model = build_with_weights(manifest.backbone, state, num_classes=len(classes))
        if (
            stored is not None
            and manifest.preprocessing == pre
            and trunk_id(trunk(model, manifest.backbone), manifest.backbone, pre, bf16=False)
            == stored[0]
        ):
            head = head_module(model, manifest.backbone)
            return _Incumbent(manifest.version, score_features(head, val, stored[1], classes), 0)
        # its logits kept from its own validation pass (and earlier scorings): new images only
        stages = manifest.stages
        if not stages and self.outputs.enabled:  # a version published before digests
            stages = stage_digests(state, manifest.backbone, len(classes))
        kept = self.outputs.score(
            model, stages, manifest.backbone, manifest.preprocessing, val, classes
        )
        if kept is None:
            return _Incumbent(
                manifest.version, self.score(model, val, manifest.preprocessing, classes), len(val)
            )
        return _Incumbent(manifest.version, *kept)

    def gate(self, candidate: Scores, incumbent: _Incumbent) -> GateDecision:
        """The spec's gate, with the settings' defaults for what it leaves unset; a retrain
        dataset's parts (base, feedback) are each compared with the serving version too, and
        classes it forgot are reported."""
        g = self.spec.gate
        max_regression = (
            g.max_regression if g.max_regression is not None else self.training.max_regression
        )
        served = incumbent.scores
        decision = decide(
            candidate.all["top1"],
            min_accuracy=g.min_accuracy
            if g.min_accuracy is not None
            else self.training.min_accuracy,
            max_regression=max_regression,
            incumbent_version=incumbent.version,
            incumbent_top1=served.all["top1"] if served else None,
            incumbent_note=incumbent.note,
        )
        if "" in candidate.parts:  # an ordinary dataset: the whole split is the one part
            return decision
        sources, forgetting = {}, []
        for name, part in candidate.parts.items():
            theirs = served.parts.get(name) if served else None
            sources[name] = SourceScore(
                images=part["images"],
                candidate_top1=part["top1"],
                incumbent_top1=theirs["top1"] if theirs else None,
            )
            if theirs is not None:
                forgetting += class_drops(
                    name, part["per_class"], theirs["per_class"], max_regression
                )
        return with_sources(decision, sources, forgetting)

    def publish(
        self,
        c: _Candidate,
        metrics: dict[str, Any],
        gate: GateDecision,
        reference: FeatureStats | None,
        exporter: ExportChild | None,
    ) -> Manifest:
        """A new immutable version (weights, calibration crops, graphs unless they come after,
        feature statistics, then the manifest)."""
        spec, trained, index, base = self.spec, c.trained, c.index, c.base
        files, graphs = ({}, {}) if self.graphs_after else self.graphs(c, exporter)
        self.phases.lap("graphs_s")  # the rest of the step (the store's writes): publish_s
        weights: WeightsUpload | list[StageTensors] = (
            self.weights_ahead.take()
            if self.weights_ahead
            else split_stages(trained.model.state_dict(), base.backbone, len(index.classes))
        )
        manifest = self.registry.publish(
            weights,
            model=spec.model,
            calibration=calibration_crops(c.val, self.store, c.preprocessing, self.training),
            extra_files=files | ({FEATURES_FILE: reference.to_bytes()} if reference else {}),
            graphs=graphs,
            drift=reference.record() if reference else None,
            backbone=base.backbone,
            num_classes=len(index.classes),
            class_names=index.classes,
            preprocessing=c.preprocessing,
            freeze=spec.freeze.model_dump(mode="json"),
            hyperparameters=spec.model_dump(
                mode="json", exclude={"model", "base", "dataset", "freeze"}
            ),
            dataset={**index.summary(), "skipped_images": len(trained.skipped)},
            parent=base.parent,
            metrics=metrics,
            gate=gate.model_dump(mode="json"),
            job_id=self.job_id,
        )
        if self.weights_ahead is not None:
            self.weights_ahead.keep()
        return manifest

    def result(
        self,
        trained: _Trained,
        index: DatasetIndex,
        base: ResolvedBase,
        metrics: dict[str, Any],
        gate: GateDecision,
        version: str | None,
        promoted: bool,
    ) -> dict[str, Any]:
        """The job's JSON result (kept in its record)."""
        spec, run = self.spec, trained.metrics
        dataset = {**index.summary(), "skipped_images": len(trained.skipped)}
        return {
            "job_id": self.job_id,
            "model": spec.model,
            "version": version,
            "published": version is not None,
            "promoted": promoted,
            "alias": spec.alias,
            "parent": base.parent,
            "metrics": metrics,
            "gate": gate.model_dump(mode="json"),
            "skipped_images": len(trained.skipped),
            "resumed_from_epoch": int(run.get("resumed_from_epoch", 0)),
            "epochs_run": int(run.get("epoch", 0)),
            "best_epoch": int(trained.best_metrics.get("epoch", 0)),
            "images_per_s": float(run.get("images_per_s", 0.0)),
            "dataset": dataset,
            "checkpoints": trained.storage_uri,
            **self.phases.added_up(run, time.time() - self.started),
        }
