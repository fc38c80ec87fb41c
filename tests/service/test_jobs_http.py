"""Fine-tune jobs over HTTP: create (idempotent), watch, gate -> publish -> promote ->
hot-load, queueing, cancel, 429, errors, metrics. Real Ray Serve, Ray Train and SeaweedFS."""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import requests
from PIL import Image

from conftest import free_port, png_bytes, train_worker_pids, write_imagefolder
from service.control.runner_clients import stop_actors
from service.embedded_store import Connection
from service.settings import RefitSettings, ServeSettings
from training.job_settings import TrainingSettings
from training.local_fit import stored_checkpoints
from training.storage.s3 import ObjectStore

pytestmark = [
    pytest.mark.ray,
    pytest.mark.serve,
    pytest.mark.trains,
    pytest.mark.usefixtures("ray_session"),
]
ADMIN, PREDICT = "admin-token-jobs", "predict-token-jobs"
SMALL = {"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def app(seaweed: Connection) -> Iterator[dict[str, Any]]:
    from service import deployments

    settings = RefitSettings(
        s3=seaweed.s3_settings(prefix=f"jobs-{uuid.uuid4().hex[:8]}"),
        serve=ServeSettings(
            port=free_port(),
            numeric_mode="fp32",  # the suite's mode (conftest)
            admin_token=ADMIN,
            predict_token=PREDICT,
            poll_interval_s=30,  # long: a prompt swap proves the push, not the poll
            classifier_cpus=1,
            classifier_replicas=1,  # /metrics scrapes see the one replica
            # tiny classifier queue: test_overload_gets_503_with_retry_after
            max_ongoing_requests=1,
            max_queued_requests=1,
            max_batch_size=1,
        ),
        training=TrainingSettings(
            export_graphs=("openvino", "int8"),  # the import below makes both
            max_running_jobs=1,
            max_queued_jobs=1,
            progress_interval_s=0.5,
            checkpoint_interval_s=0,  # a checkpoint per epoch: B is cancelled after its first
        ),
    )
    store = ObjectStore(settings.s3)
    write_imagefolder(store, "synth", classes=3, train=16, val=6)
    deployments.run(settings)
    try:
        url = f"http://127.0.0.1:{settings.serve.port}"
        requests.get(url + "/readyz", timeout=60)
        yield {"url": url, "store": store, "cpus": ray.available_resources().get("CPU", 0)}
    finally:
        deployments.shutdown()
        stop_actors(settings)


def _spec(store: ObjectStore, **over: Any) -> dict[str, Any]:
    spec = {
        "model": "synth",
        "base": {"backbone": "resnet18"},
        "dataset": store.uri("datasets/synth/"),
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.003,
        "workers": 1,
        "preprocess": SMALL,
        "augment": {"hflip": False},
        "gate": {"max_regression": 1.0},
    }
    return {**spec, **over}


def _call(app, method: str, path: str, *, token: str | None = ADMIN, **kw: Any):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, app["url"] + path, headers=headers, timeout=60, **kw)


def _wait(app, job_id: str, until, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _call(app, "GET", f"/v1/finetune-jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"timed out; last state {job['state']}: {job}")


def _predict_version(app) -> str | None:
    r = _call(
        app,
        "POST",
        "/v1/models/synth/predict",
        token=PREDICT,
        json={"images": [base64.b64encode(png_bytes(1)).decode()]},
    )
    return r.json()["model_version"] if r.status_code == 200 else None


def test_job_end_to_end_then_queue_cancel_and_limits(app: dict[str, Any]) -> None:
    store = app["store"]
    assert _predict_version(app) is None  # nothing published yet: 404

    # -- create, with an idempotent retry -------------------------------------------------------
    r = _call(app, "POST", "/v1/finetune-jobs", json=_spec(store), headers={"Idempotency-Key": "a"})
    assert r.status_code == 202, r.text
    first = r.json()
    job_a = first["job_id"]
    assert r.headers["location"] == f"/v1/finetune-jobs/{job_a}"
    assert first["state"] == "queued"
    assert first["model"] == "synth"
    again = _call(
        app, "POST", "/v1/finetune-jobs", json=_spec(store), headers={"Idempotency-Key": "a"}
    )
    assert again.status_code == 200
    assert again.json()["job_id"] == job_a
    assert again.headers["idempotent-replayed"] == "true"
    clash = _call(
        app,
        "POST",
        "/v1/finetune-jobs",
        json=_spec(store, epochs=3),
        headers={"Idempotency-Key": "a"},
    )
    assert clash.status_code == 409
    assert clash.json()["error"]["field"] == "Idempotency-Key"

    # -- a second job for the same model waits; a third finds the queue full (429) ---------------
    running = _wait(app, job_a, lambda j: j["state"] == "running")
    assert running["attempts"] == 1
    assert running["started_at"]
    r = _call(app, "POST", "/v1/finetune-jobs", json=_spec(store, epochs=8))
    assert r.status_code == 202
    job_b = r.json()["job_id"]
    full = _call(app, "POST", "/v1/finetune-jobs", json=_spec(store, model="other"))
    assert full.status_code == 429
    assert full.headers["retry-after"]
    assert full.json()["error"]["code"] == "too_many_jobs"

    # -- watch A: progress with steps, then gate -> publish -> promote -> pushed hot-load ---------
    seen_steps = []

    def done(job: dict[str, Any]) -> bool:
        if job["progress"]["step"]:
            seen_steps.append(job["progress"]["step"])
        return job["state"] in {"succeeded", "failed", "cancelled"}

    finished = _wait(app, job_a, done)
    assert finished["state"] == "succeeded", finished
    result = finished["result"]
    assert result["published"]
    assert result["promoted"]
    assert finished["reason"].startswith(f"published {result['version']}")
    progress = finished["progress"]
    assert progress["epochs_done"] == 2
    assert [h["epoch"] for h in progress["history"]] == [1, 2]
    assert "val_top1" in progress["metrics"]
    assert seen_steps, "no step progress was visible while the job ran"
    png = _call(app, "GET", f"/v1/finetune-jobs/{job_a}/curve.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (640, 420)
    # the poll interval is 30 s: a swap within seconds is the push from the job
    deadline = time.monotonic() + 15
    while _predict_version(app) != result["version"]:
        assert time.monotonic() < deadline, "the new version never answered"
        time.sleep(0.2)

    # -- B starts once A is done (one job per model); cancel it after its first checkpoint ------
    _wait(app, job_b, lambda j: j["progress"]["epochs_done"] >= 1)
    deadline = time.monotonic() + 60  # stored while the next epoch trains
    while not stored_checkpoints(store, job_b):
        assert time.monotonic() < deadline, "B's first checkpoint was never stored"
        time.sleep(0.2)
    r = _call(app, "POST", f"/v1/finetune-jobs/{job_b}/cancel")
    assert r.status_code == 202, r.text
    cancelled = _wait(app, job_b, lambda j: j["state"] != "running", timeout=60)
    assert cancelled["state"] == "cancelled", cancelled
    assert "checkpoints kept" in cancelled["reason"]
    assert stored_checkpoints(store, job_b)  # kept for a retry
    deadline = time.monotonic() + 30  # the actor table marks them dead once they are gone
    while train_worker_pids():
        assert time.monotonic() < deadline, "cancel left Ray Train workers running"
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # and their CPUs are free again (no reservation leaked)
    while ray.available_resources().get("CPU", 0) < app["cpus"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)
    again = _call(app, "POST", f"/v1/finetune-jobs/{job_b}/cancel")
    assert again.status_code == 409

    # -- listing, metrics ------------------------------------------------------------------------
    listed = _call(app, "GET", "/v1/finetune-jobs").json()["jobs"]
    assert [j["job_id"] for j in listed] == [job_b, job_a]
    assert [
        j["job_id"] for j in _call(app, "GET", "/v1/finetune-jobs?state=cancelled").json()["jobs"]
    ] == [job_b]
    text = _call(app, "GET", "/metrics").text  # the admin token may scrape too
    assert 'refit_jobs_finished_total{state="succeeded"} 1.0' in text
    assert 'refit_jobs_finished_total{state="cancelled"} 1.0' in text
    assert 'refit_jobs{state="queued"} 0.0' in text
    assert "refit_training_images_per_second" in text
    assert 'refit_batch_size_bucket{le="1"}' in text
    assert "refit_classifier_queue_depth" in text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("POST", "/v1/finetune-jobs", {"token": None, "json": {}}, 401, None),
        ("POST", "/v1/finetune-jobs", {"token": PREDICT, "json": {}}, 403, None),
        ("GET", "/v1/finetune-jobs", {"token": None}, 401, None),
        ("POST", "/v1/finetune-jobs", {"data": b"{oops"}, 400, "body"),
        ("POST", "/v1/finetune-jobs", {"json": [1, 2]}, 400, "body"),
        ("POST", "/v1/finetune-jobs", {"json": {"model": "x"}}, 422, None),
        ("GET", "/v1/finetune-jobs/job-20990101-000000-abcdef", {}, 404, "job_id"),
        ("GET", "/v1/finetune-jobs/NOT..AN..ID", {}, 400, "job_id"),
        ("POST", "/v1/finetune-jobs/job-20990101-000000-abcdef/cancel", {}, 404, "job_id"),
        ("GET", "/v1/finetune-jobs?state=exploded", {}, 400, "state"),
        ("GET", "/v1/finetune-jobs?limit=0", {}, 400, "limit"),
    ],
)
def test_job_api_errors(app, method, path, kwargs, status, field) -> None:
    r = _call(app, method, path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"]
    assert err["message"]
    if field:
        assert err["field"] == field


def test_bad_spec_names_the_field(app: dict[str, Any]) -> None:
    r = _call(app, "POST", "/v1/finetune-jobs", json=_spec(app["store"], epochs=-1))
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "epochs"
    r = _call(
        app, "POST", "/v1/finetune-jobs", json=_spec(app["store"], dataset="s3://elsewhere/x/")
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "dataset"
    empty = _spec(app["store"], dataset=app["store"].uri("datasets/nothing-here/"))
    r = _call(app, "POST", "/v1/finetune-jobs", json=empty)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "dataset"


def test_overload_gets_503_with_retry_after(app: dict[str, Any]) -> None:
    """Past the classifier's queue, requests get 503 + Retry-After (JSON), and the service
    keeps serving. Runs after the end-to-end test published the synth model."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"images": [base64.b64encode(png_bytes(i % 3, seed=i)).decode() for i in range(8)]}

    def one(_: int):
        return _call(app, "POST", "/v1/models/synth/predict", token=PREDICT, json=body)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(48)))
    codes = sorted({r.status_code for r in answers})
    assert codes == [200, 503], codes
    shed = [r for r in answers if r.status_code == 503]
    assert {r.headers.get("retry-after") for r in shed} == {"1"}
    assert {r.json()["error"]["code"] for r in shed} == {"overloaded"}
    assert _predict_version(app) is not None  # still serving


def test_cli_talks_to_the_service(app: dict[str, Any], tmp_path: Path, capsys) -> None:
    """refit jobs / predict / finetune --wait, with the URL and token from connection.json."""
    import json

    from service.cli import main as cli

    (tmp_path / "connection.json").write_text(json.dumps({"url": app["url"], "admin_token": ADMIN}))
    where = ["--data-dir", str(tmp_path)]
    assert cli.main(["jobs", *where]) == 0
    listed = capsys.readouterr().out
    assert "succeeded" in listed
    assert "cancelled" in listed
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(1))
    assert cli.main(["predict", "--model", "synth", *where, str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "synth"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(app["store"], epochs=1)))
    assert cli.main(["finetune", "--spec", str(spec), "--wait", *where]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err  # the progress bar (one line per change off a TTY)
    assert json.loads(captured.out.splitlines()[-1])["state"] == "succeeded"
    assert cli.main(["jobs", "job-20990101-000000000-abcdef", *where]) == 2  # 404 -> exit 2
    assert json.loads(capsys.readouterr().err)["error"]["field"] == "job_id"


def test_cli_imports_weights_trained_elsewhere(app: dict[str, Any], tmp_path: Path, capsys) -> None:
    """refit import: safetensors + backbone + classes + calibration images become a served
    version through the admin endpoint, serving at once; its graphs are made after it by
    the replica's export child and show on the version's page."""
    import json

    from safetensors.torch import save_file

    from service.cli import main as cli
    from training.backbones import build_backbone

    (tmp_path / "connection.json").write_text(json.dumps({"url": app["url"], "admin_token": ADMIN}))
    weights = tmp_path / "byo.safetensors"
    save_file(build_backbone("resnet18", num_classes=2).state_dict(), str(weights))
    images = tmp_path / "calibration"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.png").write_bytes(png_bytes(i % 2, seed=i))
    pre = '{"resize_size": 32, "crop_size": 32}'
    argv = ["import", "--model", "byo", "--weights", str(weights), "--backbone", "resnet18"]
    argv += ["--classes", "cat,dog", "--preprocessing", pre, "--calibration", str(images)]
    argv += ["--promote", "production", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"]["version"] == out["version"]
    assert out["graphs_pending"] == ["openvino", "int8"]  # made after it went live
    deadline = time.monotonic() + 180
    while True:
        detail = _call(app, "GET", f"/v1/models/byo/versions/{out['version']}", token=ADMIN)
        assert detail.status_code == 200, detail.text
        if detail.json()["graphs"]:
            break
        assert time.monotonic() < deadline, "the imported version's graphs were not stored"
        time.sleep(0.5)
    assert set(detail.json()["graphs"]) == {"openvino", "int8"}
    r = _call(
        app,
        "POST",
        "/v1/models/byo/predict",
        token=PREDICT,
        json={"images": [base64.b64encode(png_bytes(1)).decode()]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == out["version"]
    assert r.json()["predictions"][0][0]["label"] in {"cat", "dog"}
