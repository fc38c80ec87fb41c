"""The typed app builder: ``serve run service.app:build_app``, ``serve deploy`` and KubeRay's
``serveConfigV2`` (``import_path: service.app:build_app``) all build the app here.

Settings come from the environment (``REFIT_*``); ``args`` may override the ``serve`` section.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.deployments import Application, application
from service.settings import RefitSettings, ServeSettings, get_settings


class AppArgs(BaseModel):
    """Builder arguments: overrides of ``REFIT_SERVE__*`` settings, by field name."""

    model_config = ConfigDict(extra="forbid")

    serve: dict[str, Any] = Field(default_factory=dict)

    @field_validator("serve")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        # ServeSettings ignores unknown keys; a misspelled override must not pass silently
        unknown = sorted(set(value) - set(ServeSettings.model_fields))
        if unknown:
            valid = ", ".join(sorted(ServeSettings.model_fields))
            raise ValueError(f"unknown serve settings {unknown}; valid: {valid}")
        return value


def settings_with(args: AppArgs, base: RefitSettings | None = None) -> RefitSettings:
    """Settings with the builder's overrides applied and validated."""
    base = base or get_settings()
    merged = ServeSettings.model_validate({**base.serve.model_dump(), **args.serve})
    return base.model_copy(update={"serve": merged})


def build_app(args: AppArgs) -> Application:
    """Build the Refit Serve application (what ``serve run`` and ``serveConfigV2`` deploy)."""
    return application(settings_with(args))
