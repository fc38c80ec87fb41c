"""Feedback: a labelling client (label scope) sends true labels back; operators (admin)
see what was labelled and snapshot it as a dataset a fine-tune names."""

from __future__ import annotations

from typing import Annotated, Any, Self

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.auth import AdminScope, LabelScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane
from service.api.predict_v1 import Base64Image
from service.dataplane.feedback import FeedbackLabel
from training.storage.ids import PREDICTION_ID_PATTERN


class FeedbackRequest(BaseModel):
    """A true label for a captured prediction (``prediction_id`` and the image's ``index``)
    or for an image sent with it (``image``, base64): exactly one of the two."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={
            "examples": [{"prediction_id": "20261203-061500123-0123456789ab", "label": "cat"}]
        },
    )

    label: Annotated[str, Field(min_length=1, max_length=200)]
    new_class: bool = Field(
        default=False, description="allow a label that is not a class of the serving version"
    )
    prediction_id: Annotated[str, Field(pattern=PREDICTION_ID_PATTERN)] | None = None
    index: int = Field(default=0, ge=0, le=10_000, description="the image's index in it")
    image: Base64Image | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.prediction_id is None) == (self.image is None):
            raise ValueError("send either prediction_id or image")
        return self


class FeedbackResponse(BaseModel):
    """The stored label: the image's content hash, its split, what the model had said."""

    model: str
    sha256: str
    label: str
    split: str
    new_class: bool
    predicted: str | None
    previous_label: str | None


class FeedbackOverview(BaseModel):
    """Labels per split and class, and the dataset URI a fine-tune spec names."""

    model: str
    labels: int
    per_split: dict[str, dict[str, int]]
    dataset: str
    classes_left_out: list[str] = Field(
        default_factory=list, description="classes with one image only (not in the dataset)"
    )


labels = APIRouter(tags=["feedback"], dependencies=[LabelScope])
admin = APIRouter(tags=["feedback"], dependencies=[AdminScope])


@labels.post(
    "/v1/models/{model}/feedback",
    response_model=FeedbackResponse,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422),
)
async def send_feedback(model: ModelName, body: FeedbackRequest, plane: Plane) -> dict[str, Any]:
    """Label a captured prediction, or an image: stored once per content, the latest label
    winning, in a train/val split fixed by the image's hash."""
    label = FeedbackLabel(
        label=body.label,
        new_class=body.new_class,
        prediction_id=body.prediction_id,
        index=body.index,
        image=body.image,
    )
    return await plane.label(model, label)


@admin.get(
    "/v1/models/{model}/feedback",
    response_model=FeedbackOverview,
    responses=error_responses(400, 401, 403, 404),
)
async def feedback_overview(model: ModelName, plane: Plane) -> dict[str, Any]:
    """What was labelled for a model, per split and class."""
    return await plane.feedback.overview(model)


@admin.post(
    "/v1/models/{model}/feedback/dataset",
    response_model=FeedbackOverview,
    responses=error_responses(400, 401, 403, 404),
)
async def write_feedback_dataset(model: ModelName, plane: Plane) -> dict[str, Any]:
    """Snapshot every label as the model's feedback dataset (a JSONL manifest): its URI is
    what a fine-tune spec's ``dataset`` names."""
    return await plane.feedback.write_dataset(model)
