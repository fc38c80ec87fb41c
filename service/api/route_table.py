"""The FastAPI application: the route table over one data plane.

``create_app(settings, dataplane)`` is all a caller needs: the Serve ingress passes a data
plane whose predictor calls the classifier replicas; tests pass one over an in-process model
host and call the app through ``httpx.ASGITransport``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api import (
    captures,
    fan_out,
    feedback,
    inference_v2,
    jobs,
    model_admin,
    ops,
    predict_v1,
    quality,
    retrain_policies,
)
from service.api.error_table import EXCEPTION_HANDLERS
from service.api.middleware import BodyLimit, HeaderLimit, ObserveRequests
from service.api.oip_codec import InferenceRequest
from service.body_limits import BodyLimits
from service.dataplane.dataplane import DataPlane
from service.metrics import ScrapeCollector
from service.settings import RefitSettings
from training.spec import FinetuneSpec

_BODY_SCHEMAS: list[type[BaseModel]] = [
    predict_v1.PredictRequest,
    fan_out.FanOutRequest,
    InferenceRequest,
    FinetuneSpec,
]
"""Models that routes declare in ``openapi_extra`` (two content types, or validation with
context) and that FastAPI therefore does not collect into ``components`` by itself."""


def _openapi_with_bodies(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema(
                [(m, "validation") for m in _BODY_SCHEMAS],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def create_app(settings: RefitSettings, dataplane: DataPlane) -> FastAPI:
    """The Refit HTTP API over ``dataplane``."""
    app = FastAPI(
        title="Refit",
        version="0.1.0",
        description="Image classification serving with on-demand fine-tuning.",
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings.serve
    app.state.training = settings.training
    app.state.dataplane = dataplane
    for router in (
        predict_v1.router,
        fan_out.router,
        inference_v2.router,
        inference_v2.health,
        model_admin.reads,
        model_admin.admin,
        captures.router,
        feedback.labels,
        feedback.admin,
        quality.router,
        retrain_policies.router,
        jobs.router,
        ops.router,
    ):
        app.include_router(router)
    _openapi_with_bodies(app)

    metrics = CollectorRegistry()
    app.state.metrics = metrics
    app.state.scraped = ScrapeCollector()
    metrics.register(app.state.scraped)
    requests_total = Counter(
        "refit_http_requests_total", "HTTP requests", ["route", "status"], registry=metrics
    )
    latency = Histogram(
        "refit_http_request_seconds",
        "HTTP latency",
        ["route"],
        registry=metrics,
        buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5),
    )
    # added last = outermost: the counter sees the 413s of the body limit too
    limits = BodyLimits.of(settings.serve)
    app.add_middleware(BodyLimit, default=limits.default, limits=limits.limits)
    app.add_middleware(
        HeaderLimit,
        max_headers=settings.serve.max_headers,
        max_bytes=settings.serve.max_header_bytes,
    )
    app.add_middleware(ObserveRequests, requests_total=requests_total, latency=latency)
    return app
