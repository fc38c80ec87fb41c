"""The typed app builder that serve run / serveConfigV2 import (service.app:build_app)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve import Application

from service.app import AppArgs, build_app, settings_with
from service.settings import RefitSettings


def test_builder_applies_and_validates_overrides() -> None:
    base = RefitSettings()
    s = settings_with(AppArgs(serve={"max_batch_size": 8, "classifier_replicas": 2}), base)
    assert s.serve.max_batch_size == 8
    assert s.serve.classifier_replicas == 2
    assert s.s3 == base.s3
    with pytest.raises(ValidationError):
        settings_with(AppArgs(serve={"max_batch_size": 0}), base)
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"serve": {}, "typo": 1})
    with pytest.raises(ValidationError, match="max_batch_size"):  # lists the valid names
        AppArgs.model_validate({"serve": {"max_batchsize": 8}})


def test_build_app_returns_an_application() -> None:
    assert isinstance(build_app(AppArgs(serve={"numeric_mode": "bf16"})), Application)
