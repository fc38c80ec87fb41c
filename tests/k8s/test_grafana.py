"""The Grafana dashboard (``k8s/base/grafana/refit-dashboard.json``): valid, loadable by
Grafana's sidecar as a labelled ConfigMap, and every query names a series ``/metrics``
really exports (a renamed metric must not leave a silently empty panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from test_k8s import render

from service.api import create_app
from service.settings import RefitSettings

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "k8s" / "base" / "grafana" / "refit-dashboard.json"
)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported() -> set[str]:
    """Every sample name the service's /metrics registry can expose."""
    app = create_app(RefitSettings(), None)  # type: ignore[arg-type]  # no route is called
    scraped = app.state.scraped
    scraped.classifier = {
        "models": {
            "m": {"version": "v", "mode": "fp32", "agreement": 1.0, "fallback_kind": "speed"}
        },
        "rss_bytes": 1,
        "captures": {"m stored": 1},
        "feedback": {"m correct": 1},
        "confidence": {"m low": 1},
        "drift": {"m": {"version": "v", "score": 0.1, "samples": 1, "dropped": 0}},
    }
    scraped.jobs = {"queued": 1, "running": 1, "finished": {"succeeded": 1}, "images_per_s": 1.0}
    names = set()
    for family in app.state.metrics.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return out + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_every_query_names_an_exported_series() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dash["panels"])
    assert len(exprs) >= 15
    exported = _exported()
    used = {name for e in exprs for name in re.findall(r"\brefit_[a-z0-9_]+", e)}
    assert used - exported == set(), f"not exported: {sorted(used - exported)}"
    # the areas the dashboard is for
    for needed in (
        "refit_http_requests_total",
        "refit_http_request_seconds_bucket",
        "refit_batch_size_sum",
        "refit_classifier_queue_depth",
        "refit_model_loaded_info",
        "refit_model_swaps",
        "refit_jobs",
        "refit_training_images_per_second",
        "refit_feedback_labels_total",
        "refit_predictions_total",
        "refit_captures_total",
        "refit_drift_score",
        "refit_drift_samples_total",
    ):
        assert needed in used, needed


def test_panels_use_the_datasource_variable_and_unique_ids() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_the_sidecar_finds_the_dashboard_configmap() -> None:
    maps = [d for d in render("base") if d["kind"] == "ConfigMap"]
    dash = next(d for d in maps if d["metadata"]["name"] == "refit-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["refit-dashboard.json"])["uid"] == "refit-serving"
