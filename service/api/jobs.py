"""Fine-tune jobs (admin scope): create (``Idempotency-Key`` honoured), list, read with
progress, training curve, cancel.

The create body is the fine-tune spec. It is validated by :func:`training.spec.parse_spec`
rather than by FastAPI, because the spec's bounds (``REFIT_TRAINING__MAX_EPOCHS`` and the rest)
come from the settings as validation context, which FastAPI cannot pass; the route declares
the spec's schema as its ``requestBody`` all the same.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from service.api.auth import AdminScope
from service.api.error_table import error_responses
from service.api.params import JobId, Plane
from service.request_errors import BadRequestError
from training.spec import parse_spec
from training.storage.jobs import JobRecord

_SPEC_OBJECT = TypeAdapter(dict[str, Any])

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]

EXAMPLE_SPEC = {
    "model": "digits-5to9",
    "base": {"backbone": "resnet18", "weights": None},
    "dataset": "s3://refit/datasets/digits-5to9/",
    "freeze": {"policy": "head_only"},
    "epochs": 2,
    "batch_size": 16,
    "workers": 1,
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/FinetuneSpec"},
                "example": EXAMPLE_SPEC,
            }
        },
    }
}


class JobLinks(BaseModel):
    """Where to follow, cancel and plot the job."""

    self: str
    cancel: str
    curve: str


class JobView(JobRecord):
    """A job: its record, its progress and links."""

    model_config = ConfigDict(extra="allow")

    progress: dict[str, Any]
    links: JobLinks


class JobList(BaseModel):
    """Jobs, newest first."""

    jobs: list[JobView]


router = APIRouter(tags=["fine-tune jobs"], dependencies=[AdminScope])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="retries with the same key and spec get the same job",
    ),
]


@router.post(
    "/v1/finetune-jobs",
    status_code=202,
    response_model=JobView,
    openapi_extra=_BODY,
    responses={
        200: {"model": JobView, "description": "an Idempotency-Key replay"},
        **error_responses(400, 401, 403, 409, 413, 422, 429, 503),
    },
)
async def create_job(
    request: Request, plane: Plane, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Queue a fine-tune job: 202 with the job and ``Location``."""
    try:
        raw = _SPEC_OBJECT.validate_json(await request.body())
    except ValidationError as exc:  # not JSON, or not an object: the body, not the spec
        raise BadRequestError(
            "body must be a JSON object (the fine-tune spec)", field="body"
        ) from exc
    spec = parse_spec(raw, request.app.state.training)
    job, created = await plane.jobs.create(spec.model_dump(mode="json"), idempotency_key)
    headers = {"Location": job["links"]["self"]}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job, status_code=202 if created else 200, headers=headers)


@router.get("/v1/finetune-jobs", response_model=JobList, responses=error_responses(400, 401, 403))
async def list_jobs(
    plane: Plane,
    state: State | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Jobs, newest first, optionally of one state."""
    return {"jobs": await plane.jobs.list(limit=limit, state=state)}


@router.get(
    "/v1/finetune-jobs/{job_id}",
    response_model=JobView,
    responses=error_responses(400, 401, 403, 404),
)
async def get_job(job_id: JobId, plane: Plane) -> dict[str, Any]:
    """One job with its progress (epoch and step of total, images/s, ETA, metrics, history)."""
    return await plane.jobs.get(job_id)


@router.get(
    "/v1/finetune-jobs/{job_id}/curve.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(400, 401, 403, 404)},
)
async def job_curve(job_id: JobId, plane: Plane) -> Response:
    """The training curve: loss and validation top-1 per epoch."""
    return Response(await plane.jobs.curve(job_id), media_type="image/png")


@router.post(
    "/v1/finetune-jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobView,
    responses=error_responses(400, 401, 403, 404, 409),
)
async def cancel_job(job_id: JobId, plane: Plane) -> dict[str, Any]:
    """Stop the job's workers (its checkpoints stay); 409 once it has ended."""
    return await plane.jobs.cancel(job_id)
