"""Typed path parameters and the data plane dependency, shared by the route modules."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator

from service.dataplane.dataplane import DataPlane
from training.storage.ids import ID_PATTERN, is_id


def check_id(value: str) -> str:
    """``value`` if it is a valid id, else ValueError (pydantic reports it, naming the field)."""
    if not is_id(value):
        raise ValueError(f"must match {ID_PATTERN} (lowercase letters, digits, '._-'; no '..')")
    return value


def _id(description: str) -> object:
    return Path(pattern=ID_PATTERN, min_length=1, max_length=64, description=description)


ModelName = Annotated[str, _id("model name"), AfterValidator(check_id)]
VersionId = Annotated[str, _id("version id"), AfterValidator(check_id)]
JobId = Annotated[str, _id("job id"), AfterValidator(check_id)]


async def dataplane(request: Request) -> DataPlane:
    """The data plane the app was created with (``async``: no thread hand-off per request)."""
    plane: DataPlane = request.app.state.dataplane
    return plane


Plane = Annotated[DataPlane, Depends(dataplane)]
