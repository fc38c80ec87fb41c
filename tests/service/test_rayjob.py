"""The rayjob launcher against a fake Kubernetes API server (no cluster can run here), and its
RayJob manifest against KubeRay's schema."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from k8s_schemas import validator
from service.control.rayjob import (
    KubeApi,
    RayJobLauncher,
    rayjob_manifest,
    rayjob_name,
    rayjob_owner,
)
from service.control.scheduler import JobRunner
from service.settings import RefitSettings, env_names
from training.job_settings import TrainingSettings
from training.spec import parse_spec
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore


class FakeKube:
    """RayJobs in memory behind the few API paths the launcher uses."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _name(self) -> str | None:
                prefix = "/apis/ray.io/v1/namespaces/refit/rayjobs"
                assert self.path.startswith(prefix), self.path
                rest = self.path[len(prefix) :].strip("/")
                return rest or None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append(("POST", self.path, self.headers.get("Authorization")))
                name = body["metadata"]["name"]
                if name in fake.jobs:
                    return self._send(409, {"reason": "AlreadyExists"})
                fake.jobs[name] = {**body, "status": {"jobDeploymentStatus": "Initializing"}}
                return self._send(201, fake.jobs[name])

            def do_GET(self) -> None:
                name = self._name()
                fake.calls.append(("GET", self.path, self.headers.get("Authorization")))
                if name not in fake.jobs:
                    return self._send(404, {"reason": "NotFound"})
                return self._send(200, fake.jobs[name])

            def do_DELETE(self) -> None:
                name = self._name()
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.calls.append(("DELETE", self.path, self.headers.get("Authorization")))
                if fake.jobs.pop(name, None) is None:
                    return self._send(404, {"reason": "NotFound"})
                return self._send(200, {"status": "Success"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube()
    yield fake
    fake.server.shutdown()


def _spec(store: ObjectStore, **over: Any):
    raw = {
        "model": "cats",
        "base": {"backbone": "resnet50", "weights": "IMAGENET1K_V2"},
        "dataset": store.uri("datasets/cats/"),
        "workers": 2,
        "use_gpu": True,
    }
    return parse_spec({**raw, **over})


def test_manifest_is_a_valid_rayjob(store: ObjectStore) -> None:
    settings = RefitSettings(training=TrainingSettings(cpus_per_worker=6))
    manifest = rayjob_manifest("job-20261122-000000-abcdef", _spec(store), settings)
    errors = [e.message for e in validator("ray.io/v1/RayJob").iter_errors(manifest)]
    assert errors == []
    assert manifest["metadata"]["name"] == "refit-job-20261122-000000-abcdef"
    assert manifest["spec"]["entrypoint"] == (
        "refit run-job job-20261122-000000-abcdef --owner rayjob:refit-job-20261122-000000-abcdef"
    )
    group = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    env = [e["name"] for e in container["env"]]
    assert set(env) <= set(env_names())
    # secrets by reference only
    assert all("valueFrom" in e for e in container["env"])
    cpu = rayjob_manifest("job-x", _spec(store, use_gpu=False), settings)
    cpu_limits = cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_limits["containers"][0]["resources"]["limits"]


def test_launcher_start_watch_stop(store: ObjectStore, kube: FakeKube) -> None:
    launcher = RayJobLauncher(
        RefitSettings(), KubeApi(kube.url, "refit", token="sa-token"), check_s=0
    )
    owner = launcher.claim("job-a")
    assert owner == rayjob_owner("job-a")
    assert launcher.owns("job-a", owner)  # a restarted runner follows its RayJob again
    assert not launcher.owns("job-a", "local:cli")
    spec = _spec(store).model_dump(mode="json")
    launcher.start("job-a", spec, owner)
    launcher.start("job-a", spec, owner)  # a restarted runner: the RayJob is kept
    assert list(kube.jobs) == [rayjob_name("job-a")]
    assert all(auth == "Bearer sa-token" for _, _, auth in kube.calls)
    assert launcher.ended("job-a") is None
    assert launcher.poll("job-a") is None
    kube.jobs[rayjob_name("job-a")]["status"] = {"jobStatus": "FAILED"}
    assert launcher.ended("job-a") == "FAILED"
    end = launcher.poll("job-a")
    assert end is not None
    assert (end.error, end.process_died) == ("RayJob ended: FAILED", False)  # no retry here
    launcher.stop("job-a")
    assert kube.jobs == {}
    assert launcher.ended("job-a") == "missing"
    stopped = launcher.poll("job-a")
    assert stopped is not None
    assert stopped.error == "RayJob ended: deleted on cancel"
    launcher.stop("job-a")  # absent is fine


def _wait(jobs: JobStore, job_id: str, state: str) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = jobs.get(job_id)
        if record.state == state:
            return record
        time.sleep(0.1)
    raise AssertionError(f"{job_id} stayed {record.state}")


def test_runner_with_rayjob_launcher(
    settings: RefitSettings, store: ObjectStore, kube: FakeKube
) -> None:
    store.put_bytes("datasets/cats/train/a/0.png", b"x")
    launcher = RayJobLauncher(settings, KubeApi(kube.url, "refit", token=None), check_s=0.2)
    notices: list[str] = []
    runner = JobRunner(settings, launcher=launcher, notify_published=lambda _, m: notices.append(m))
    jobs = JobStore(store)
    try:
        spec = _spec(store).model_dump(mode="json")
        done = runner.create(spec, None)["record"]["job_id"]
        _wait(jobs, done, "running")
        assert rayjob_name(done) in kube.jobs
        # the RayJob's entrypoint (refit run-job) ends the record, then KubeRay
        # reports the job succeeded: the runner counts it
        jobs.transition(
            done, "succeeded", reason="published v1", result={"published": True, "version": "v1"}
        )
        kube.jobs[rayjob_name(done)]["status"] = {"jobStatus": "SUCCEEDED"}
        deadline = time.monotonic() + 30
        while runner.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runner.stats()["finished"] == {"succeeded": 1}
        # a RayJob publishes in its own cluster: the runner pushes the notice for it
        assert notices == [jobs.get(done).model]

        crashed = runner.create(_spec(store, model="dogs").model_dump(mode="json"), None)
        crashed_id = crashed["record"]["job_id"]
        _wait(jobs, crashed_id, "running")
        kube.jobs[rayjob_name(crashed_id)]["status"] = {"jobDeploymentStatus": "Failed"}
        failed = _wait(jobs, crashed_id, "failed")
        assert "RayJob ended: Failed" in failed.reason

        cancel_id = runner.create(_spec(store, model="owls").model_dump(mode="json"), None)
        cancel_id = cancel_id["record"]["job_id"]
        _wait(jobs, cancel_id, "running")
        runner.cancel(cancel_id)
        cancelled = _wait(jobs, cancel_id, "cancelled")
        assert "checkpoints kept" in cancelled.reason
        assert rayjob_name(cancel_id) not in kube.jobs  # deleted with its cluster
    finally:
        runner.close()
