"""``POST /v1/variants/predict``: the same images answered by several models at once.

The ground for comparing variants (a canary beside the serving version, a shadow, per-variant
evaluation): the images are decoded once per preprocessing, and the versions whose trunks have
the same content (fine-tunes that differ in the head) run it once over them, each its own head
after it (``service.runtime.model_host``). Every answer is what ``POST /v1/models/{model}/predict``
gives for that model, with its own version and prediction id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from service.api.auth import PredictScope, Settings
from service.api.error_table import error_responses
from service.api.params import Plane, check_id
from service.api.predict_v1 import EXAMPLE_IMAGE, Base64Image, PredictResponse
from service.request_errors import BadRequestError, TooLargeError, bad_request
from training.storage.ids import ID_PATTERN

ModelId = Annotated[
    str, Field(pattern=ID_PATTERN, min_length=1, max_length=64), AfterValidator(check_id)
]


class FanOutRequest(BaseModel):
    """The models to ask (each at most once) and the images, base64."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={
            "examples": [{"models": ["shop-a", "shop-b"], "images": [EXAMPLE_IMAGE], "top_k": 3}]
        },
    )

    models: list[ModelId] = Field(
        min_length=1, description="model names, each once (at most REFIT_SERVE__MAX_FAN_OUT)"
    )
    images: list[Base64Image] = Field(min_length=1, description="encoded images, base64")
    top_k: int = Field(default=5, ge=1, description="labels per image")


class FanOutResponse(BaseModel):
    """One answer per model, in the order asked."""

    answers: list[PredictResponse]


_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FanOutRequest"}}},
    }
}

router = APIRouter(tags=["predict"], dependencies=[PredictScope])


@router.post(
    "/v1/variants/predict",
    response_model=FanOutResponse,
    openapi_extra=_BODY,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
)
async def predict_variants(request: Request, plane: Plane, settings: Settings) -> dict[str, Any]:
    """Top-k labels for each image from the serving version of every model asked: one
    decode, and one trunk pass for the versions that share their trunk."""
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.startswith("application/json"):
        raise BadRequestError("use application/json", field="content-type")
    try:
        body = FanOutRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise bad_request(exc) from None
    if len(body.models) > settings.max_fan_out:
        raise BadRequestError(f"at most {settings.max_fan_out} models", field="models")
    repeated = sorted({m for m in body.models if body.models.count(m) > 1})
    if repeated:
        raise BadRequestError(f"each model once; repeated: {repeated}", field="models")
    if len(body.images) > settings.max_images:
        n = len(body.images)
        raise TooLargeError(f"{n} images; at most {settings.max_images}", field="images")
    if body.top_k > settings.max_top_k:
        raise BadRequestError(f"must be 1..{settings.max_top_k}", field="top_k")
    answers = await plane.predict_many(body.models, body.images, body.top_k)
    return {"answers": answers}
