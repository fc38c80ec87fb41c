"""Metrics read at scrape time from a classifier replica and the job runner.

The ingress owns request counters itself; what other processes know (loaded versions, swaps,
batch sizes, queue depth, jobs, training throughput) comes from their ``stats()`` snapshot,
set on this collector just before ``generate_latest``. Label values are published model names,
version ids and fixed state names: never raw request input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from training.storage.jobs import STATES, TERMINAL

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def batch_histogram(sizes: dict[Any, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and the sum from ``{batch size: count}``."""
    counts = {int(k): int(v) for k, v in sizes.items()}
    buckets = [(str(b), float(sum(c for s, c in counts.items() if s <= b))) for b in BATCH_BUCKETS]
    buckets.append(("+Inf", float(sum(counts.values()))))
    return buckets, float(sum(s * c for s, c in counts.items()))


def _by_label(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: dict[str, float],
) -> Metric:
    """A family with one sample per value of one label (fixed label values)."""
    family = kind(name, doc, labels=[label])
    for value, n in values.items():
        family.add_metric([value], n)
    return family


class ScrapeCollector(Collector):
    """Turns the latest classifier and job-runner snapshots into metric families."""

    def __init__(self) -> None:
        self.classifier: dict[str, Any] = {}
        self.jobs: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        """The metric families of the current snapshots."""
        yield from self._classifier()
        yield from self._jobs()

    def _classifier(self) -> Iterator[Metric]:
        c = self.classifier
        loaded = GaugeMetricFamily(
            "refit_model_loaded_info",
            "Version a classifier replica serves, in which numeric mode",
            labels=["model", "version", "mode"],
        )
        agreement = GaugeMetricFamily(
            "refit_model_mode_agreement",
            "Top-1 agreement of the numeric mode with fp32 on the calibration images",
            labels=["model"],
        )
        fallback = GaugeMetricFamily(
            "refit_model_mode_fallback",
            "1 where the configured numeric mode was refused and fp32 serves: it disagreed "
            "with fp32 on the calibration images (agreement), ran slower (speed), or the "
            "version has no graph for it (unavailable)",
            labels=["model", "reason"],
        )
        passed_over = GaugeMetricFamily(
            "refit_model_mode_passed_over",
            "1 for each mode numeric mode auto weighed and does not serve: it disagreed with "
            "fp32 (agreement), ran slower here than the mode chosen (speed), or the version "
            "has no graph for it (unavailable)",
            labels=["model", "mode", "reason"],
        )
        swaps = GaugeMetricFamily(
            "refit_model_swaps", "Hot swaps of a model (replica lifetime)", labels=["model"]
        )
        failed = GaugeMetricFamily(
            "refit_model_failed_loads", "Failed hot-loads (old model kept)", labels=["model"]
        )
        for name, m in c.get("models", {}).items():
            if m.get("version"):
                loaded.add_metric([name, m["version"], m.get("mode") or "fp32"], 1)
            if m.get("agreement") is not None:
                agreement.add_metric([name], m["agreement"])
            if m.get("fallback_kind") in ("agreement", "speed", "unavailable"):  # fixed labels
                fallback.add_metric([name, m["fallback_kind"]], 1)
            for mode, why in (m.get("passed_over") or {}).items():
                if why.get("reason") in ("agreement", "speed", "unavailable"):  # fixed labels
                    passed_over.add_metric([name, mode, why["reason"]], 1)
            swaps.add_metric([name], m.get("swaps", 0))
            failed.add_metric([name], m.get("failed_loads", 0))
        yield from (loaded, agreement, fallback, passed_over, swaps, failed)
        if "rss_bytes" not in c:
            return
        yield GaugeMetricFamily(
            "refit_classifier_rss_bytes", "Classifier replica resident memory", value=c["rss_bytes"]
        )
        allocator = GaugeMetricFamily(
            "refit_classifier_allocator_info",
            "The classifier replica's memory allocator (jemalloc, glibc-tuned or glibc)",
            labels=["allocator"],
        )
        allocator.add_metric([str(c.get("allocator", "unknown"))], 1)
        yield allocator
        yield GaugeMetricFamily(
            "refit_classifier_models_alive",
            "Model objects alive in a classifier replica (replaced versions must be freed)",
            value=c.get("models_alive", 0),
        )
        yield GaugeMetricFamily(
            "refit_classifier_queue_depth",
            "Requests waiting for or inside a batch in a classifier replica",
            value=c.get("queue_depth", 0),
        )
        yield CounterMetricFamily(
            "refit_batches_split_by_version",
            "Batches that held requests for two versions during a swap; each version ran in "
            "its own forward pass (a forward pass never mixes versions)",
            value=c.get("split_batches", 0),
        )
        yield CounterMetricFamily(
            "refit_batches_shared_trunk",
            "Forward passes that ran leading stages of the same content once for the merged "
            "requests of several versions (fine-tunes of one backbone), each version's own "
            "stages and head after them",
            value=c.get("shared_trunk_passes", 0),
        )
        # counters per model and one more label; snapshots key them "model label"
        per_model = (
            (
                "refit_captures",
                "Predictions captured for labelling: stored, dropped (the replica's capture "
                "queue was full) or failed (the store refused)",
                "outcome",
                "captures",
            ),
            (
                "refit_feedback_labels",
                "Labels taken: correct or wrong (a captured prediction's top-1 against its "
                "label), upload (an image sent with its label)",
                "outcome",
                "feedback",
            ),
            (
                "refit_predictions",
                "Images classified, by confidence: low where the top-1 score is below "
                "REFIT_CAPTURE__LOW_CONFIDENCE_METRIC_BELOW",
                "confidence",
                "confidence",
            ),
        )
        for name, doc, label, key in per_model:
            family = CounterMetricFamily(name, doc, labels=["model", label])
            for pair, n in c.get(key, {}).items():
                family.add_metric(pair.split(" ", 1), n)
            yield family
        drift = GaugeMetricFamily(
            "refit_drift_score",
            "Share of a replica's last sampled images whose penultimate features lie beyond "
            "the serving version's reference threshold (about 0.05 in distribution)",
            labels=["model"],
        )
        drift_samples = CounterMetricFamily(
            "refit_drift_samples",
            "Served images sampled for the drift score: measured, or dropped (the replica's "
            "drift queue was full)",
            labels=["model", "outcome"],
        )
        for model, d in c.get("drift", {}).items():
            if d.get("score") is not None:
                drift.add_metric([model], d["score"])
            drift_samples.add_metric([model, "measured"], d.get("samples", 0))
            drift_samples.add_metric([model, "dropped"], d.get("dropped", 0))
        yield drift
        yield drift_samples
        loads = CounterMetricFamily(
            "refit_classifier_model_loads",
            "Cold loads in a classifier replica: a model it did not hold (the first request for "
            "it, or one after it was evicted)",
            value=c.get("model_loads", 0),
        )
        yield loads
        yield _by_label(
            GaugeMetricFamily,
            "refit_classifier_model_bytes",
            "Tensor bytes of the eager (fp32) models a classifier replica holds: resident (a "
            "stage several versions share counted once) and separate (each on its own)",
            "kind",
            {k: c.get("model_bytes", {}).get(k, 0) for k in ("resident", "separate")},
        )
        models = c.get("model_cache", {})
        yield _by_label(
            GaugeMetricFamily,
            "refit_classifier_model_cache_bytes",
            "Memory of the model versions a classifier replica keeps loaded, together (the "
            "figure REFIT_SERVE__MODEL_CACHE_MB bounds: shared stages once, graph copies "
            "estimated), and that budget",
            "kind",
            {k: models.get(k, 0) for k in ("bytes", "budget")},
        )
        yield GaugeMetricFamily(
            "refit_classifier_resident_trunks",
            "Distinct trunk contents among the models a classifier replica has loaded in fp32 "
            "or a traced mode (variants of one trunk in one mode hold it once)",
            value=models.get("resident_trunks", 0),
        )
        yield CounterMetricFamily(
            "refit_classifier_model_parks",
            "Models a classifier replica parked (dropped their loaded version) to keep the "
            "others within REFIT_SERVE__MODEL_CACHE_MB; each loads again on its next request",
            value=models.get("parks", 0),
        )
        cache = c.get("stage_cache", {})
        yield GaugeMetricFamily(
            "refit_classifier_stage_cache_bytes",
            "Verified weight files (stage by stage) a classifier replica keeps in memory "
            "(REFIT_SERVE__STAGE_CACHE_MB)",
            value=cache.get("bytes", 0),
        )
        yield _by_label(
            CounterMetricFamily,
            "refit_classifier_stage_reads",
            "Stage files a classifier replica's loads used: from memory (a stage shared with "
            "a version it loaded before) or read from the store",
            "source",
            {k: cache.get(k, 0) for k in ("memory", "store")},
        )
        buckets, total = batch_histogram(c.get("batch_sizes", {}))
        yield HistogramMetricFamily(
            "refit_batch_size",
            "Requests merged into one forward pass (replica lifetime)",
            buckets=buckets,
            sum_value=total,
        )

    def _jobs(self) -> Iterator[Metric]:
        j = self.jobs
        if not j:
            return
        now = GaugeMetricFamily("refit_jobs", "Fine-tune jobs now, by state", labels=["state"])
        now.add_metric(["queued"], j.get("queued", 0))
        now.add_metric(["running"], j.get("running", 0))
        yield now
        done = CounterMetricFamily(
            "refit_jobs_finished",
            "Fine-tune jobs ended since the job runner started, by state",
            labels=["state"],
        )
        finished = j.get("finished", {})
        for state in STATES:
            if state in TERMINAL:
                done.add_metric([state], finished.get(state, 0))
        yield done
        yield GaugeMetricFamily(
            "refit_training_images_per_second",
            "Training throughput of all running jobs (images/s)",
            value=j.get("images_per_s", 0.0),
        )
