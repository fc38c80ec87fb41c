"""Open Inference Protocol v2 (KServe, Triton, MLServer): infer, model metadata and
readiness, server health.

An infer body is JSON (:class:`InferenceRequest`) or, with the binary tensor extension, that
JSON header followed by raw tensor bytes (``Inference-Header-Content-Length`` says where the
header ends). Both are declared in the route's OpenAPI ``requestBody``; the codec validates the
header with the same pydantic model either way.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.api.auth import PredictScope, Settings
from service.api.error_table import RETRY_AFTER_S, error_responses
from service.api.oip_codec import (
    InferenceResponse,
    MetadataModelResponse,
    MetadataTensor,
    build_response,
    parse_infer,
)
from service.api.params import ModelName, Plane, VersionId
from service.api.predict_v1 import EXAMPLE_IMAGE
from training.storage.errors import NotFoundError, RefitError

_EXAMPLE = {
    "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_IMAGE]}],
    "parameters": {"top_k": 3},
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/InferenceRequest"},
                "example": _EXAMPLE,
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the JSON header, then the binary tensor data",
            },
        },
    }
}
_INFER_RESPONSES = {
    200: {
        "description": "JSON, or the JSON header and binary outputs (octet-stream)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(400, 401, 403, 404, 413, 415, 422, 503),
}

HeaderLength = Annotated[
    int | None,
    Header(
        alias="Inference-Header-Content-Length",
        ge=0,
        description="binary extension: bytes of JSON before the tensor data",
    ),
]


class LiveResponse(BaseModel):
    """Server liveness."""

    live: bool


class ReadyResponse(BaseModel):
    """Server readiness."""

    ready: bool


class ModelReadyResponse(BaseModel):
    """Whether a model has a version to serve."""

    name: str
    ready: bool


health = APIRouter(tags=["inference v2"])
router = APIRouter(tags=["inference v2"], dependencies=[PredictScope])


@health.get("/v2/health/live", response_model=LiveResponse)
async def v2_live() -> LiveResponse:
    """The process answers."""
    return LiveResponse(live=True)


@health.get(
    "/v2/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}
)
async def v2_ready(plane: Plane) -> JSONResponse:
    """Whether the predictor answers (503 while it does not)."""
    ok = await plane.ready()
    retry = {} if ok else {"Retry-After": RETRY_AFTER_S[HTTPStatus.SERVICE_UNAVAILABLE]}
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=retry)


@router.get(
    "/v2/models/{model}",
    response_model=MetadataModelResponse,
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
async def v2_metadata(model: ModelName, plane: Plane) -> MetadataModelResponse:
    """The serving version's inputs, outputs and class names."""
    m = await plane.manifest(model)
    size = m.preprocessing.crop_size
    return MetadataModelResponse(
        name=model,
        versions=[m.version],
        platform=f"pytorch_torchvision_{m.backbone}",
        inputs=[
            MetadataTensor(name="images", datatype="BYTES", shape=[-1]),
            MetadataTensor(name="input", datatype="FP32", shape=[-1, 3, size, size]),
        ],
        outputs=[
            MetadataTensor(name="labels", datatype="BYTES", shape=[-1, -1]),
            MetadataTensor(name="scores", datatype="FP32", shape=[-1, -1]),
        ],
        parameters={"class_names": m.class_names},
    )


@router.get(
    "/v2/models/{model}/ready",
    response_model=ModelReadyResponse,
    responses={503: {"model": ModelReadyResponse}, **error_responses(400, 401, 403, 404)},
)
async def v2_model_ready(model: ModelName, plane: Plane) -> JSONResponse:
    """200 when the model has a version to serve, 503 while it has none."""
    try:
        await plane.manifest(model)
        ready = True
    except RefitError as exc:
        if exc.status == HTTPStatus.NOT_FOUND:
            raise
        ready = False
    return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)


async def _infer(
    model: str,
    version: str | None,
    request: Request,
    plane: Plane,
    settings: Settings,
    header_length: int | None,
) -> Response:
    req = parse_infer(
        await request.body(),
        header_length,
        max_images=settings.max_images,
        content_type=request.headers.get("content-type"),
    )
    top_k = min(req.top_k or 5, settings.max_top_k)
    if req.images is not None:
        result = await plane.predict(model, req.images, top_k)
    else:
        assert req.tensor is not None
        result = await plane.predict_tensor(model, req.tensor, top_k)
    if version is not None and version != result["model_version"]:
        raise NotFoundError(
            f"version {version!r} is not served; {result['model_version']} is", field="version"
        )
    content, headers, media = build_response(result, req)
    return Response(content, headers=headers, media_type=media)


@router.post(
    "/v2/models/{model}/infer",
    response_model=InferenceResponse,
    openapi_extra=_BODY,
    responses=_INFER_RESPONSES,
)
async def v2_infer(
    model: ModelName,
    request: Request,
    plane: Plane,
    settings: Settings,
    header_length: HeaderLength = None,
) -> Response:
    """Classify with the serving version."""
    return await _infer(model, None, request, plane, settings, header_length)


@router.post(
    "/v2/models/{model}/versions/{version}/infer",
    response_model=InferenceResponse,
    openapi_extra=_BODY,
    responses=_INFER_RESPONSES,
)
async def v2_infer_version(
    model: ModelName,
    version: VersionId,
    request: Request,
    plane: Plane,
    settings: Settings,
    header_length: HeaderLength = None,
) -> Response:
    """Classify, if ``version`` is the one serving (404 naming ``version`` otherwise)."""
    return await _infer(model, version, request, plane, settings, header_length)
