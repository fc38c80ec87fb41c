"""Serve autoscaling of the classifier on real Ray Serve: load adds a replica, quiet removes
it, and every answer during both is correct (issue 11, item 2)."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from conftest import free_port, png_bytes, publish_tiny_model
from service.embedded_store import Connection
from service.settings import RefitSettings, ServeSettings
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.usefixtures("ray_session")]


def _running_classifiers() -> int:
    from ray import serve

    status = serve.status().applications["refit"].deployments["Classifier"]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture
def scaling_app(seaweed: Connection) -> Iterator[str]:
    from service import deployments

    settings = RefitSettings(
        s3=seaweed.s3_settings(prefix=f"scale-{uuid.uuid4().hex[:8]}"),
        serve=ServeSettings(
            port=free_port(),
            numeric_mode="fp32",  # the suite's mode (conftest)
            classifier_cpus=1,
            classifier_replicas=1,
            classifier_max_replicas=2,
            target_ongoing_requests=1,
            upscale_delay_s=1,
            downscale_delay_s=3,
            poll_interval_s=5,
        ),
    )
    publish_tiny_model(Registry(ObjectStore(settings.s3)), "digits")
    deployments.run(settings)
    try:
        yield f"http://127.0.0.1:{settings.serve.port}/v1/models/digits/predict"
    finally:
        deployments.shutdown()


def test_classifier_scales_up_under_load_and_back_down(scaling_app: str) -> None:
    body = {"images": [base64.b64encode(png_bytes(0)).decode()]}
    assert requests.post(scaling_app, json=body, timeout=60).status_code == 200
    assert _running_classifiers() == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                statuses.append(s.post(scaling_app, json=body, timeout=60).status_code)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while _running_classifiers() < 2:
            assert time.monotonic() < deadline, "no second replica under load"
            time.sleep(0.5)
        time.sleep(2)  # the new replica answers too
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert statuses
    assert set(statuses) == {200}
    deadline = time.monotonic() + 120
    while _running_classifiers() > 1:
        assert time.monotonic() < deadline, "the extra replica stayed after the load"
        time.sleep(0.5)
    assert requests.post(scaling_app, json=body, timeout=60).status_code == 200
