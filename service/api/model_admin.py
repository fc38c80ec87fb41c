"""Models: what is published and what serves (predict scope), and moving an alias (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.api.auth import AdminScope, PredictScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane, check_id
from training.storage.ids import ID_PATTERN

Id = Annotated[str, Field(pattern=ID_PATTERN, max_length=64), AfterValidator(check_id)]


class ModelSummary(BaseModel):
    """A published model and, under the served alias' name (``production``), the version
    it points at."""

    model_config = ConfigDict(extra="allow")

    name: str


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
