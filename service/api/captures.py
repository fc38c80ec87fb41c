"""Capture (admin): a model's capture policy, and what it captured. Captured images are
request data: none can be read without the admin token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel

from service.api.auth import AdminScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane
from training.storage.captures import CapturePolicy, CaptureRecord
from training.storage.ids import PREDICTION_ID_PATTERN

PredictionId = Annotated[
    str, Path(pattern=PREDICTION_ID_PATTERN, max_length=40, description="a prediction's id")
]
ImageIndex = Annotated[int, Path(ge=0, le=10_000, description="the image's index in the request")]


class CapturePolicyView(BaseModel):
    """The policy in force for a model: its stored one, or the settings' default."""

    model: str
    source: str
    enabled: bool
    policy: CapturePolicy


class CaptureRef(BaseModel):
    """One captured image of a prediction."""

    prediction_id: str
    index: int


class CaptureList(BaseModel):
    """A page of a model's captures, oldest first; ``next_after`` continues it."""

    model: str
    captures: list[CaptureRef]
    next_after: str | None


router = APIRouter(tags=["capture"], dependencies=[AdminScope])


@router.get(
    "/v1/models/{model}/capture",
    response_model=CapturePolicyView,
    responses=error_responses(400, 401, 403, 404),
)
async def get_capture_policy(model: ModelName, plane: Plane) -> dict[str, Any]:
    """The capture policy in force for a model."""
    return await plane.captures.policy(model)


@router.put(
    "/v1/models/{model}/capture",
    response_model=CapturePolicyView,
    responses=error_responses(400, 401, 403, 404, 422),
)
async def set_capture_policy(
    model: ModelName, policy: CapturePolicy, plane: Plane
) -> dict[str, Any]:
    """Store a model's capture policy; every replica applies it within
    ``REFIT_CAPTURE__REFRESH_S``."""
    return await plane.captures.set_policy(model, policy)


@router.get(
    "/v1/models/{model}/captures",
    response_model=CaptureList,
    responses=error_responses(400, 401, 403, 404, 422),
)
async def list_captures(
    model: ModelName,
    plane: Plane,
    after: Annotated[str | None, Query(pattern=PREDICTION_ID_PATTERN, max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """A model's captured predictions, oldest first, after a prediction id."""
    return await plane.captures.list(model, after=after, limit=limit)


@router.get(
    "/v1/models/{model}/captures/{prediction_id}/{index}",
    response_model=CaptureRecord,
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
async def get_capture(
    model: ModelName, prediction_id: PredictionId, index: ImageIndex, plane: Plane
) -> CaptureRecord:
    """One captured image's record: the version, labels and scores that answered, and why it
    was kept."""
    record: CaptureRecord = await plane.captures.record(model, prediction_id, index)
    return record


@router.get(
    "/v1/models/{model}/captures/{prediction_id}/{index}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}},
        **error_responses(400, 401, 403, 404, 409, 422),
    },
)
async def get_capture_image(
    model: ModelName, prediction_id: PredictionId, index: ImageIndex, plane: Plane
) -> Response:
    """One captured image, as the client sent it."""
    data, media = await plane.captures.image(model, prediction_id, index)
    return Response(data, media_type=media)
