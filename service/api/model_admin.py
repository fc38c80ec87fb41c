"""Models: what is published and what serves (predict scope), and moving an alias (admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, File, Form, Request, UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Json, field_validator

from service.api.auth import AdminScope, PredictScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane, VersionId, check_id
from service.dataplane.model_import import ImportRequest
from service.request_errors import TooLargeError
from training.preprocessing_spec import Preprocessing
from training.storage.ids import ID_PATTERN
from training.storage.registry import StageDigest

Id = Annotated[str, Field(pattern=ID_PATTERN, max_length=64), AfterValidator(check_id)]


class PassedOverView(BaseModel):
    """Why numeric mode ``auto`` does not serve a mode."""

    reason: Literal["agreement", "speed", "unavailable"]
    detail: str


class ServingView(BaseModel):
    """How the replica that answered serves a model it has loaded (replicas on one kind of
    CPU choose alike): the version, the numeric mode and its top-1 agreement with fp32,
    why a configured mode fell back to fp32, and (``auto``) why each other mode does not
    serve."""

    version: str
    mode: str | None = None
    agreement: float | None = None
    fallback: str | None = None
    passed_over: dict[str, PassedOverView] = Field(default_factory=dict)
    shared_stages: list[str] = Field(default_factory=list)
    """Eager fp32: its leading stages that it holds together with versions this replica
    loaded before (one copy: the same content)."""
    shared_bytes: int | None = None
    """Their bytes."""
    model_bytes: int | None = None
    """Every tensor byte of its model, shared ones included (eager fp32)."""
    trunk: str | None = None
    """fp32 and the traced modes: its trunk's content (the backbone and a digest of every
    stage but the head); the models listed with the same trunk (and mode) hold it once and
    run it once per batch."""


class ModelSummary(BaseModel):
    """A published model and, under the served alias' name (``production``), the version
    it points at."""

    model_config = ConfigDict(extra="allow")

    name: str
    serving: ServingView | None = None
    """Absent where the answering replica has not loaded the model."""


class ModelList(BaseModel):
    """Published models."""

    models: list[ModelSummary]


class VersionList(BaseModel):
    """A model's published versions (oldest first) and its served alias."""

    model: str
    versions: list[str]
    aliases: dict[str, str | None]


class PromoteRequest(BaseModel):
    """Point an alias at a published version."""

    model_config = ConfigDict(extra="forbid")

    version: Id
    alias: Id = "production"


class RollbackRequest(BaseModel):
    """Move an alias back to the version it held before."""

    model_config = ConfigDict(extra="forbid")

    alias: Id = "production"


class AliasMove(BaseModel):
    """Where an alias points now, and where it pointed before."""

    model: str
    alias: str
    version: str
    previous: str | None


ClassName = Annotated[str, Field(min_length=1, max_length=200)]


class ImportMetadata(BaseModel):
    """How to rebuild and feed uploaded weights (the ``metadata`` part of an import)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(max_length=64, description="A torchvision architecture Refit knows.")
    class_names: list[ClassName] = Field(min_length=2, max_length=100_000)
    preprocessing: Preprocessing
    graphs: list[Literal["openvino", "int8"]] | None = Field(
        default=None,
        description="OpenVINO graphs to make from the calibration images (default: "
        "REFIT_TRAINING__EXPORT_GRAPHS; [] for none).",
    )
    promote: Id | None = Field(default=None, description="Point this alias at the version.")
    source: str | None = Field(default=None, max_length=500, description="Provenance note.")

    @field_validator("class_names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        return names


class GraphSummary(BaseModel):
    """One graph of the version and how closely it follows fp32."""

    files: list[str]
    calibration_agreement: float
    held_out_agreement: float | None
    images: int
    unquantized: list[str] = []
    """INT8: the layers left in floating point (the classifier head; more where accuracy
    control restored them to reach ``REFIT_TRAINING__INT8_MIN_AGREEMENT``)."""


class ImportedVersion(BaseModel):
    """The version an import published, and the alias move if it was promoted. It serves
    fp32 at once; the graphs named in ``graphs_pending`` are made after it, and a replica
    serving their mode switches once they are stored (``GET .../versions/{version}`` shows
    them)."""

    model: str
    version: str
    graphs_pending: list[str]
    promoted: AliasMove | None


class VersionDetail(BaseModel):
    """One published version: what it is, where it came from, how it scored, and its graphs
    (those made after it was published included)."""

    model: str
    version: str
    created_at: str
    backbone: str
    class_names: list[str]
    parent: str | None
    job_id: str | None
    metrics: dict[str, Any]
    graphs: dict[str, GraphSummary]
    stages: list[StageDigest] = Field(
        description="The sha256 of each stage's tensors, in stage order, head last: versions "
        "whose leading stages hash the same share them exactly (empty: published before "
        "they were recorded)"
    )


reads = APIRouter(tags=["models"], dependencies=[PredictScope])
admin = APIRouter(tags=["models"], dependencies=[AdminScope])


@reads.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 503))
async def list_models(plane: Plane) -> ModelList:
    """Published models and the version each one's alias serves."""
    return ModelList(models=[ModelSummary(**m) for m in await plane.list_models()])


@reads.get(
    "/v1/models/{model}/versions",
    response_model=VersionList,
    responses=error_responses(400, 401, 403, 404, 503),
)
async def list_versions(model: ModelName, plane: Plane) -> dict[str, Any]:
    """A model's versions and its alias."""
    return await plane.list_versions(model)


@reads.get(
    "/v1/models/{model}/versions/{version}",
    response_model=VersionDetail,
    responses=error_responses(400, 401, 403, 404, 503),
)
async def version_detail(model: ModelName, version: VersionId, plane: Plane) -> dict[str, Any]:
    """One version's manifest, in short, with its graphs."""
    return await plane.version_detail(model, version)


@admin.post(
    "/v1/models/{model}/promote",
    response_model=AliasMove,
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
async def promote(model: ModelName, body: PromoteRequest, plane: Plane) -> dict[str, Any]:
    """Point the alias at a version (verified first; compare-and-swap); replicas follow."""
    return await plane.promote(model, body.version, body.alias)


@admin.post(
    "/v1/models/{model}/rollback",
    response_model=AliasMove,
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
async def rollback(
    model: ModelName, plane: Plane, body: Annotated[RollbackRequest | None, Body()] = None
) -> dict[str, Any]:
    """Move the alias back one step (the body is optional: ``production`` by default)."""
    return await plane.rollback(model, (body or RollbackRequest()).alias)


@admin.post(
    "/v1/models/{model}/versions",
    response_model=ImportedVersion,
    status_code=201,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def import_weights(
    model: ModelName,
    plane: Plane,
    request: Request,
    weights: Annotated[UploadFile, File(description="The state dict as safetensors.")],
    metadata: Annotated[Json[ImportMetadata], Form(description="ImportMetadata as JSON.")],
    calibration: Annotated[
        list[UploadFile] | None,
        File(description="Images (JPEG, PNG, WebP) the graphs are calibrated and checked on."),
    ] = None,
) -> dict[str, Any]:
    """Publish weights trained elsewhere as a verified version (bring your own model): the
    same loadability checks as promote (422 naming what is wrong, nothing published)."""
    serve = request.app.state.settings
    images = calibration or []
    if len(images) > serve.max_calibration_images:
        raise TooLargeError(
            f"{len(images)} calibration images; at most {serve.max_calibration_images}",
            field="calibration",
        )
    training = request.app.state.training
    req = ImportRequest(
        model=model,
        weights=await weights.read(),
        backbone=metadata.backbone,
        class_names=metadata.class_names,
        preprocessing=metadata.preprocessing,
        calibration=[await f.read() for f in images],
        graphs=tuple(training.export_graphs if metadata.graphs is None else metadata.graphs),
        quantize_images=training.quantize_images,
        source=metadata.source,
        int8_min_agreement=training.int8_min_agreement,
    )
    return await plane.import_version(req, serve, metadata.promote)
