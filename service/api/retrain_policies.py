"""Retrain policy (admin): when a model is fine-tuned again from feedback."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from service.api.auth import AdminScope
from service.api.error_table import error_responses
from service.api.params import ModelName, Plane
from training.storage.retrain_policies import PolicyState, RetrainPolicy


class RetrainPolicyView(BaseModel):
    """A model's retrain policy (null when it has none) and what the job runner did with it
    (null until the runner first saw it): when it last fired, the job it started, why a
    firing started none."""

    model: str
    policy: RetrainPolicy | None
    state: PolicyState | None = None


router = APIRouter(tags=["retrain policy"], dependencies=[AdminScope])
PATH = "/v1/models/{model}/retrain-policy"


@router.get(PATH, response_model=RetrainPolicyView, responses=error_responses(400, 401, 403, 404))
async def get_retrain_policy(model: ModelName, plane: Plane) -> dict[str, Any]:
    """The model's retrain policy."""
    return await plane.policies.get(model)


@router.put(
    PATH, response_model=RetrainPolicyView, responses=error_responses(400, 401, 403, 404, 422)
)
async def set_retrain_policy(
    model: ModelName, policy: RetrainPolicy, plane: Plane
) -> dict[str, Any]:
    """Store the model's retrain policy (triggers, cooldown, concurrency, job settings)."""
    return await plane.policies.set(model, policy)


@router.delete(
    PATH, response_model=RetrainPolicyView, responses=error_responses(400, 401, 403, 404)
)
async def delete_retrain_policy(model: ModelName, plane: Plane) -> dict[str, Any]:
    """Remove the model's retrain policy."""
    return await plane.policies.delete(model)
