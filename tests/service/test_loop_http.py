"""The adaptation loop end to end over HTTP on the real stack (SeaweedFS, Ray, Serve, Ray
Train): predictions are captured, a labelling client sends labels back, the retrain policy
fires in the job runner, the job trains on base + feedback, the gate scores both parts, and
the new version answers - with the trigger in the job record and the cooldown holding the
next firing back."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from conftest import free_port, png_bytes, publish_tiny_model
from service.control.runner_clients import stop_actors
from service.embedded_store import Connection
from service.settings import CaptureSettings, DriftSettings, RefitSettings, ServeSettings
from training.job_settings import TrainingSettings
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore

pytestmark = [
    pytest.mark.ray,
    pytest.mark.serve,
    pytest.mark.trains,
    pytest.mark.usefixtures("ray_session"),
]
ADMIN, PREDICT, LABEL = "admin-token-loop", "predict-token-loop", "label-token-loop"
CLASSES = "abc"


@pytest.fixture(scope="module")
def loop_app(seaweed: Connection) -> Iterator[dict[str, Any]]:
    from service import deployments

    settings = RefitSettings(
        s3=seaweed.s3_settings(prefix=f"loop-{uuid.uuid4().hex[:8]}"),
        serve=ServeSettings(
            port=free_port(),
            numeric_mode="fp32",  # the suite's mode (conftest)
            admin_token=ADMIN,
            predict_token=PREDICT,
            label_token=LABEL,
            poll_interval_s=30,  # long: the new version answering proves the push
            classifier_cpus=1,
            classifier_replicas=1,
        ),
        capture=CaptureSettings(rate=1.0, max_per_class_per_hour=None),
        drift=DriftSettings(sample_rate=1.0, flush_s=0.5),
        training=TrainingSettings(policy_check_s=0.5, progress_interval_s=0.5),
    )
    store = ObjectStore(settings.s3)
    for c, name in enumerate(CLASSES):  # the base dataset, classes a b c
        for i in range(20):  # a val split of 12: enough for the drift reference
            store.put_bytes(f"datasets/base/{name}/{i:03d}.png", png_bytes(c, seed=i * 7 + c))
    v1 = publish_tiny_model(Registry(store), "shapes")[0].version
    deployments.run(settings)
    try:
        url = f"http://127.0.0.1:{settings.serve.port}"
        requests.get(url + "/readyz", timeout=60)
        yield {"url": url, "store": store, "v1": v1}
    finally:
        deployments.shutdown()
        stop_actors(settings)


def _call(app: dict[str, Any], method: str, path: str, token: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.request(method, app["url"] + path, headers=headers, timeout=60, **kw)


def _predict(app: dict[str, Any], image: bytes, model: str = "shapes") -> dict[str, Any]:
    body = {"images": [base64.b64encode(image).decode()]}
    r = _call(app, "POST", f"/v1/models/{model}/predict", PREDICT, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-prediction-id"] == r.json()["prediction_id"]
    return dict(r.json())


def _label(
    app: dict[str, Any], prediction_id: str, label: str, model: str = "shapes"
) -> dict[str, Any]:
    body = {"prediction_id": prediction_id, "index": 0, "label": label}
    deadline = time.monotonic() + 20
    while True:  # the capture is stored off the request path: it may land a moment later
        r = _call(app, "POST", f"/v1/models/{model}/feedback", LABEL, json=body)
        if r.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _send_labelled(
    app: dict[str, Any], n: int, seed: int, model: str = "shapes", shift: int = 0
) -> None:
    """Predict ``n`` shapes and label each (``shift``: with the next class's name, wrongly)."""
    for i in range(n):
        c = i % 3
        answer = _predict(app, png_bytes(c, seed=seed + i), model)
        _label(app, answer["prediction_id"], CLASSES[(c + shift) % 3], model)


def _ended(app: dict[str, Any], job_id: str, timeout: float = 400) -> dict[str, Any]:
    """The job once it ended (its record as the API shows it)."""
    deadline = time.monotonic() + timeout
    while (job := _call(app, "GET", f"/v1/finetune-jobs/{job_id}", ADMIN).json())["state"] not in {
        "succeeded",
        "failed",
        "cancelled",
    }:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return dict(job)


def _triggered_jobs(app: dict[str, Any]) -> list[dict[str, Any]]:
    jobs = _call(app, "GET", "/v1/finetune-jobs?limit=20", ADMIN).json()["jobs"]
    return [j for j in jobs if j.get("trigger")]


def test_labels_fire_the_policy_and_the_new_version_answers(loop_app: dict[str, Any]) -> None:
    app = loop_app
    policy = {
        "every_n_labels": 10,
        "cooldown_s": 600,
        "base_dataset": app["store"].uri("datasets/base/"),
        "epochs": 4,
        "lr": 0.003,
        "batch_size": 8,
        # the loop, not the learning: four epochs from a random net on 70 images may score
        # below the random incumbent (CI saw 0.33 against 0.67); the gate refusing is the
        # subject of test_accuracy_below_fires_and_its_labels_never_fire_again
        "max_regression": 1.0,
    }
    r = _call(app, "PUT", "/v1/models/shapes/retrain-policy", ADMIN, json=policy)
    assert r.status_code == 200, r.text
    _policy_seen(app, "shapes")  # the runner sees the policy first: labels count from then
    assert _call(app, "POST", "/v1/models/shapes/feedback", PREDICT, json={}).status_code == 403

    _send_labelled(app, 9, seed=1000)
    time.sleep(1.5)  # three policy passes: nine labels fire nothing
    assert _triggered_jobs(app) == []
    _send_labelled(app, 1, seed=2000)
    deadline = time.monotonic() + 30
    while not (jobs := _triggered_jobs(app)):
        assert time.monotonic() < deadline, "the policy did not fire"
        time.sleep(0.3)
    (job,) = jobs
    assert job["trigger"]["kind"] == "every_n_labels"
    assert job["trigger"]["serving_version"] == app["v1"]
    assert job["spec"]["base"]["version"] == f"shapes@{app['v1']}"
    assert set(job["trigger"]["dataset"]["images"]) == {"base", "feedback"}

    job = _ended(app, job["job_id"])
    assert job["state"] == "succeeded", job
    result = job["result"]
    gate = result["gate"]
    assert set(gate["sources"]) == {"base", "feedback"}
    assert all(s["incumbent_top1"] is not None for s in gate["sources"].values())
    assert set(result["metrics"]["sources"]) == {"base", "feedback"}
    assert result["published"], gate["reasons"]
    v2 = result["version"]

    deadline = time.monotonic() + 30
    while _predict(app, png_bytes(0, seed=9))["model_version"] != v2:
        assert time.monotonic() < deadline, "the new version never answered"
        time.sleep(0.2)
    state = _call(app, "GET", "/v1/models/shapes/retrain-policy", ADMIN).json()["state"]
    assert state["fired"] == 1
    assert state["last_job_id"] == job["job_id"]
    # the cooldown holds: ten more labels start nothing
    _send_labelled(app, 10, seed=3000)
    time.sleep(1.5)
    assert len(_triggered_jobs(app)) == 1
    quality = _call(app, "GET", "/v1/models/shapes/quality", ADMIN).json()
    assert quality["versions"][app["v1"]]["labels"] == 10
    assert quality["versions"][v2]["labels"] == 10
    # the job recorded v2's feature statistics; the replica measures what v2 serves (v1, a
    # version published without statistics, had no drift score)
    assert Registry(app["store"]).read_manifest("shapes", v2)[0].drift is not None
    deadline = time.monotonic() + 30
    while (drift := quality["drift"]) is None or drift["samples"] < 10:
        assert time.monotonic() < deadline, quality["drift"]
        time.sleep(0.5)
        quality = _call(app, "GET", "/v1/models/shapes/quality", ADMIN).json()
    assert drift["version"] == v2
    assert 0 <= drift["score"] <= 1
    assert drift["expected"] == pytest.approx(0.05)


def _policy_seen(app: dict[str, Any], model: str) -> None:
    deadline = time.monotonic() + 30
    path = f"/v1/models/{model}/retrain-policy"
    while _call(app, "GET", path, ADMIN).json()["state"] is None:
        assert time.monotonic() < deadline, "the job runner never evaluated the policy"
        time.sleep(0.3)


def test_accuracy_below_fires_and_its_labels_never_fire_again(loop_app: dict[str, Any]) -> None:
    """The live-accuracy trigger over HTTP: labels on a model that answers badly fire it once;
    the gate refuses the retrain (the labels name every shape's neighbour, so no candidate
    scores the 1.0 its policy's floor asks on base and feedback validation images at once);
    the labels it fired on never fire it again, even past the cooldown (judged on the state
    and labels the real runner stored), while new labels on the same serving version do."""
    from datetime import UTC, datetime, timedelta

    from service.control.retrain_triggers import decide_trigger, live_accuracy
    from training.storage.feedback import Feedback
    from training.storage.retrain_policies import RetrainPolicies

    app, model = loop_app, "shapes-acc"
    store = app["store"]
    registry = Registry(store)
    publish_tiny_model(registry, model)  # random weights: far below 0.9 on the shapes
    policy = {
        "accuracy_below": 0.9,
        "window_labels": 20,
        "cooldown_s": 300,
        "base_dataset": store.uri("datasets/base/"),
        "min_accuracy": 1.0,  # out of reach: the feedback contradicts the base
        "epochs": 2,
        "lr": 0.003,
        "batch_size": 8,
    }
    r = _call(app, "PUT", f"/v1/models/{model}/retrain-policy", ADMIN, json=policy)
    assert r.status_code == 200, r.text
    _policy_seen(app, model)
    _send_labelled(app, 20, seed=5000, model=model, shift=1)
    deadline = time.monotonic() + 30
    while not (fired := [j for j in _triggered_jobs(app) if j["model"] == model]):
        assert time.monotonic() < deadline, "the accuracy trigger did not fire"
        time.sleep(0.3)
    (job,) = fired
    assert job["trigger"]["kind"] == "accuracy_below"
    job = _ended(app, job["job_id"])
    assert job["state"] == "succeeded", job
    assert not job["result"]["published"], job["result"]["gate"]  # refused: v1 still serves

    policies, feedback = RetrainPolicies(store), Feedback(store)
    stored_policy, state = policies.get(model), policies.state(model)
    assert stored_policy is not None
    assert state is not None
    assert state.fired == 1
    past_cooldown = datetime.now(UTC) + timedelta(seconds=301)

    def decision() -> Any:
        serving = registry.serving_manifest(model, "production")
        items = feedback.items(model)
        return decide_trigger(stored_policy, state, items, serving.version, past_cooldown)

    assert decision() is None  # the same labels: no second firing, ever
    serving = registry.serving_manifest(model, "production").version
    _send_labelled(app, 20, seed=6000, model=model, shift=1)  # new labels on what serves now
    accuracy, n = live_accuracy(feedback.items(model), serving, 20, since=state.last_fired_at)
    assert n == 20
    assert accuracy < 0.9  # the same random model still answers, judged by wrong names
    again = decision()
    assert again is not None
    assert again[0] == "accuracy_below"
