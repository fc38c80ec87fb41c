"""Live quality (admin): accuracy and confusion from the labels sent back for captured
predictions, as JSON and as a chart."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel

from service.api.auth import AdminScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane
from training.storage.drift_scores import DriftScore
from training.storage.quality_index import RECENT


class Window(BaseModel):
    """Accuracy over the latest labels, and the versions they judged."""

    labels: int
    accuracy: float | None
    versions: dict[str, int]


class VersionQuality(BaseModel):
    """One version's labelled predictions: accuracy, the share it answered with a top-1
    score below ``low_confidence_below``, accuracy per true class, and the confusion (true
    label -> predicted label -> count)."""

    labels: int
    accuracy: float | None
    low_confidence_rate: float | None
    per_class_accuracy: dict[str, float]
    confusion: dict[str, dict[str, int]]


class HourQuality(BaseModel):
    """Labels received in one clock hour (UTC, ``YYYYMMDDHH``): accuracy, low-confidence
    rate."""

    hour: str
    labels: int
    accuracy: float | None
    low_confidence_rate: float | None


class QualityReport(BaseModel):
    """A model's live quality, from feedback on its captured predictions (every label of a
    prediction counts, relabels of an image included; relabelling the same prediction
    corrects its judgement)."""

    model: str
    labels: int
    last: Window
    low_confidence_below: float
    versions: dict[str, VersionQuality]
    hours: list[HourQuality]
    drift: DriftScore | None = None
    """Input drift of the serving version: the share of sampled live images whose
    penultimate features lie beyond its reference threshold (None: no replica has measured
    any, or the version has no reference)."""


router = APIRouter(tags=["quality"], dependencies=[AdminScope])


@router.get(
    "/v1/models/{model}/quality",
    response_model=QualityReport,
    responses=error_responses(400, 401, 403, 404),
)
async def get_quality(
    model: ModelName,
    plane: Plane,
    last: Annotated[int, Query(ge=1, le=RECENT, description="labels in the live window")] = 500,
) -> dict[str, Any]:
    """Accuracy over the latest labels, per version (with confusion) and per hour."""
    return await plane.quality.report(model, last=last)


@router.get(
    "/v1/models/{model}/quality.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(400, 401, 403, 404)},
)
async def quality_chart(model: ModelName, plane: Plane) -> Response:
    """Live accuracy and labels received, per hour (PNG)."""
    return Response(await plane.quality.chart(model), media_type="image/png")
