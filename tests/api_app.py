"""The API in process, for the route and OpenAPI tests: the FastAPI app over a real data
plane (the test's SeaweedFS prefix, real tiny models in an in-process ModelHost, a real job
runner whose launcher only records what it was asked to do)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr

from conftest import publish_tiny_model
from fake_launcher import RecordingLauncher
from service.api import create_app
from service.control.runner_clients import InProcessScheduler
from service.control.scheduler import JobRunner
from service.dataplane import in_process_dataplane
from service.settings import RefitSettings, ServeSettings
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore

ADMIN, PREDICT, METRICS = "admin-secret", "predict-secret", "metrics-secret"
LABEL = "label-secret"


def build_inprocess_app(
    settings: RefitSettings, *, publish: bool = False
) -> tuple[FastAPI, dict[str, Any]]:
    """The app and its parts (``store``, ``registry``, ``plane``, ``notified``, ``launcher``,
    ``runner``; ``close``: call it when done). ``publish``: a served model ``digits`` first."""
    serve = ServeSettings(
        numeric_mode="fp32",  # the suite's mode (conftest)
        admin_token=SecretStr(ADMIN),
        predict_token=SecretStr(PREDICT),
        metrics_token=SecretStr(METRICS),
        label_token=SecretStr(LABEL),
        max_body_bytes=300_000,
        max_image_bytes=100_000,  # under the body cap: the image's own cap can be reached
        poll_interval_s=30,
    )
    settings = settings.model_copy(update={"serve": serve})
    store = ObjectStore(settings.s3)
    registry = Registry(store)
    if publish:
        publish_tiny_model(registry, "digits", drift=True)
    notified: list[str] = []

    async def notify(model: str) -> None:
        notified.append(model)

    launcher = RecordingLauncher()
    runner = JobRunner(settings, launcher=launcher, notify_published=lambda *_: None)
    plane = in_process_dataplane(settings, InProcessScheduler(runner), notify=notify)
    host = plane.predictor.host  # type: ignore[attr-defined]  # the in-process predictor's

    def close() -> None:
        """The runner's thread and the models' polling threads stop (none outlives the
        test's store, nor reads through a class another test spies on)."""
        runner.close()
        for follower in list(host.followers.values()):
            follower.stop()

    parts = {
        "close": close,
        "settings": settings,
        "store": store,
        "registry": registry,
        "plane": plane,
        "notified": notified,
        "launcher": launcher,
        "runner": runner,
    }
    return create_app(settings, plane), parts


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization`` header."""
    return {"Authorization": f"Bearer {token}"}
