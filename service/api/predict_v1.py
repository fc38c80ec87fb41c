"""``POST /v1/models/{model}/predict``: JSON with base64 images, or multipart image files.

One route takes both content types. FastAPI declares a body per route for one content type,
so the route declares both in its OpenAPI ``requestBody`` and validates the one it got with
the matching pydantic model (:class:`PredictRequest` or :class:`PredictForm`).
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.api.auth import PredictScope, Settings
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane
from service.request_errors import BadRequestError, TooLargeError, bad_request


def _example_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


EXAMPLE_IMAGE = _example_png()
"""A real 32x32 PNG, base64: the documented example (a client generator's valid request)."""

Base64Image = Annotated[
    bytes,
    WithJsonSchema({"type": "string", "format": "byte", "description": "JPEG, PNG or WebP"}),
]


class PredictRequest(BaseModel):
    """JSON predict body: base64-encoded images."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={"examples": [{"images": [EXAMPLE_IMAGE], "top_k": 3}]},
    )

    images: list[Base64Image] = Field(min_length=1, description="encoded images, base64")
    top_k: int = Field(default=5, ge=1, description="labels per image")


class PredictForm(BaseModel):
    """Multipart predict body: one or more image files (any field name but ``top_k``)."""

    model_config = ConfigDict(extra="forbid")

    files: list[bytes] = Field(min_length=1, description="image files")
    top_k: int = Field(default=5, ge=1, description="labels per image")


class ScoredLabel(BaseModel):
    """One label and its probability."""

    label: str
    score: float


class PredictResponse(BaseModel):
    """Top-k labels per image, the version that answered (also ``X-Model-Version``) and the
    prediction's id (also ``X-Prediction-Id``): a label sent back to
    ``POST /v1/models/{model}/feedback`` names it, and the image's index."""

    model: str
    model_version: str
    prediction_id: str
    predictions: list[list[ScoredLabel]]


_FORM_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1, "default": 5},
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "multipart/form-data": {"schema": _FORM_SCHEMA},
        },
    }
}

router = APIRouter(tags=["predict"], dependencies=[PredictScope])


async def _form_inputs(request: Request, max_images: int) -> PredictForm:
    try:
        form = await request.form(max_files=max_images, max_fields=8)
    except (MultiPartException, HTTPException) as exc:
        # malformed body, no boundary, too many parts (Starlette raises the parser's error as
        # an HTTPException inside an app)
        detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        raise BadRequestError(f"malformed multipart body: {detail}", field="body") from None
    files: list[bytes] = []
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append(await value.read())
        else:
            fields[key] = value
    if not files:
        raise BadRequestError("no image files in the form", field="images")
    try:
        return PredictForm.model_validate({"files": files, **fields})
    except ValidationError as exc:
        raise bad_request(exc) from None


async def predict_inputs(request: Request, settings: Settings) -> tuple[list[bytes], int]:
    """The request's images and top_k, validated by the model of its content type."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await _form_inputs(request, settings.max_images)
        images, top_k = form.files, form.top_k
    elif ctype.startswith("application/json") or not ctype:
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise bad_request(exc) from None
        images, top_k = body.images, body.top_k
    else:
        raise BadRequestError("use application/json or multipart/form-data", field="content-type")
    if len(images) > settings.max_images:
        raise TooLargeError(f"{len(images)} images; at most {settings.max_images}", field="images")
    if top_k > settings.max_top_k:
        raise BadRequestError(f"must be 1..{settings.max_top_k}", field="top_k")
    return images, top_k


@router.post(
    "/v1/models/{model}/predict",
    response_model=PredictResponse,
    openapi_extra=_BODY,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
)
async def predict(
    model: ModelName, request: Request, response: Response, plane: Plane, settings: Settings
) -> dict[str, Any]:
    """Top-k labels for each image, from the version the model's alias serves."""
    images, top_k = await predict_inputs(request, settings)
    result = await plane.predict(model, images, top_k)
    response.headers["X-Model-Version"] = result["model_version"]
    response.headers["X-Prediction-Id"] = result["prediction_id"]
    return result
