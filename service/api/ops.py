"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.api.auth import MetricsScope
from service.api.error_table import RETRY_AFTER_S, error_responses
from service.api.params import Plane


class Health(BaseModel):
    """The process answers."""

    status: str


class Readiness(BaseModel):
    """Whether predictions can be served."""

    ready: bool


router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: answers while the event loop runs."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(plane: Plane) -> JSONResponse:
    """Readiness: 200 when the predictor answers, else 503 (with ``Retry-After``, like every
    503)."""
    ok = await plane.ready()
    retry = {} if ok else {"Retry-After": RETRY_AFTER_S[HTTPStatus.SERVICE_UNAVAILABLE]}
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=retry)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[MetricsScope],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        **error_responses(401, 403),
    },
)
async def metrics(request: Request, plane: Plane) -> Response:
    """Prometheus metrics of this app, the classifier replica and the job runner (metrics
    token or admin token: they name models, versions and job counts)."""
    scraped = request.app.state.scraped
    # metrics must answer even when the classifier or the job runner does not
    try:
        scraped.classifier = await plane.stats()
    except Exception:
        scraped.classifier = {}
    try:
        scraped.jobs = await plane.jobs.stats()
    except Exception:
        scraped.jobs = {}
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
