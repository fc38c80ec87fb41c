"""Settings: env names, AWS fallbacks, and the README table listing every variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import RefitSettings, env_names

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_variable() -> None:
    text = README.read_text()
    assert [n for n in env_names() if f"`{n}`" not in text] == []


def test_env_and_aws_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFIT_S3__BUCKET", "models")
    monkeypatch.setenv("REFIT_TRAINING__MAX_EPOCHS", "7")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    s = RefitSettings()
    assert s.s3.bucket == "models"
    assert s.training.max_epochs == 7
    assert s.s3.resolved_endpoint() == "http://127.0.0.1:9000"
    assert s.s3.resolved_access_key() == "ak"
    monkeypatch.setenv("REFIT_S3__ENDPOINT_URL", "http://127.0.0.1:8333")
    assert RefitSettings().s3.resolved_endpoint() == "http://127.0.0.1:8333"


def test_jobs_make_the_graphs_the_serving_mode_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless the training section names them, a job makes only the graphs that the
    configured numeric mode serves: both for auto (the default), none for fp32, that one for
    a graph mode."""
    monkeypatch.delenv("REFIT_SERVE__NUMERIC_MODE", raising=False)  # the suite pins fp32
    assert RefitSettings().serve.numeric_mode == "auto"
    assert RefitSettings().training.export_graphs == ("openvino", "int8")
    monkeypatch.setenv("REFIT_SERVE__NUMERIC_MODE", "fp32")
    assert RefitSettings().training.export_graphs == ()
    monkeypatch.setenv("REFIT_SERVE__NUMERIC_MODE", "int8")
    assert RefitSettings().training.export_graphs == ("int8",)
    monkeypatch.setenv("REFIT_SERVE__NUMERIC_MODE", "bf16")
    assert RefitSettings().training.export_graphs == ()
    monkeypatch.setenv("REFIT_SERVE__NUMERIC_MODE", "openvino")
    assert RefitSettings().training.export_graphs == ("openvino",)
    monkeypatch.setenv("REFIT_TRAINING__EXPORT_GRAPHS", '["openvino", "int8"]')
    assert RefitSettings().training.export_graphs == ("openvino", "int8")
    monkeypatch.delenv("REFIT_TRAINING__EXPORT_GRAPHS")
    assert RefitSettings(training={"max_epochs": 3}).training.export_graphs == ("openvino",)
    chosen = RefitSettings(training={"export_graphs": []})
    assert chosen.training.export_graphs == ()


def test_dashboard_off_by_default() -> None:
    assert RefitSettings().ray.include_dashboard is False
