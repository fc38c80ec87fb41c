"""The ``rayjob`` launcher: each fine-tune as its own KubeRay RayJob (an isolated Ray cluster
that exists for the job and is deleted after it), created through the Kubernetes API.

The job runner calls :class:`RayJobLauncher` instead of starting a Ray task. The RayJob's
entrypoint, ``refit run-job ID``, runs the job of that record, so states and
progress reach the API exactly as with the in-cluster launcher. Cancel deletes the RayJob (and
with it the cluster); checkpoints stay on the store.

Only the standard library talks to the API server, with the pod's service account (RBAC in
``k8s/base/rbac.yaml``: create, get, delete RayJobs in its own namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from service.control.launchers import RunEnd
from service.settings import RefitSettings
from training.spec import FinetuneSpec, parse_spec
from training.storage.errors import ConflictError, NotFoundError, StorageError
from training.storage.ids import is_id

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_SECRET_ENV = [
    ("REFIT_S3__ACCESS_KEY_ID", "refit-s3", "access-key-id"),
    ("REFIT_S3__SECRET_ACCESS_KEY", "refit-s3", "secret-access-key"),
]


def rayjob_owner(job_id: str) -> str:
    """The lease owner token of a job run as a RayJob: the RayJob's entrypoint holds it, and
    a restarted runner, which keeps the RayJob, recognises it as its own."""
    return f"rayjob:{rayjob_name(job_id)}"


def rayjob_name(job_id: str) -> str:
    """The RayJob's name for a job id (DNS-1123: lowercase, digits, '-')."""
    if not is_id(job_id):
        raise NotFoundError(f"no job {job_id!r}", field="job_id")
    return "refit-" + job_id.replace(".", "-").replace("_", "-")[:57]


def _pod(image: str, component: str, resources: dict[str, Any]) -> dict[str, Any]:
    env = [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for name, secret, key in _SECRET_ENV
    ]
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "refit", "app.kubernetes.io/component": component}
        },
        "spec": {
            "serviceAccountName": "refit",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "ray-head" if component == "ray-head" else "ray-worker",
                    "image": image,
                    "envFrom": [{"configMapRef": {"name": "refit-config"}}],
                    "env": env,
                    "resources": {"requests": resources, "limits": resources},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def rayjob_manifest(job_id: str, spec: FinetuneSpec, settings: RefitSettings) -> dict[str, Any]:
    """The RayJob of one fine-tune: a head that only coordinates, ``spec.workers`` workers
    (one GPU each when ``use_gpu``), deleted after the job (its checkpoints are on S3)."""
    t = settings.training
    worker: dict[str, Any] = {"cpu": f"{t.cpus_per_worker:g}", "memory": t.rayjob_worker_memory}
    if spec.use_gpu:
        worker["nvidia.com/gpu"] = "1"
    worker_pod = _pod(t.rayjob_image, "train-worker", worker)
    if spec.use_gpu:
        worker_pod["spec"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(job_id),
            "labels": {"app.kubernetes.io/name": "refit", "refit.dev/job-id": job_id},
        },
        "spec": {
            "entrypoint": f"refit run-job {job_id} --owner {rayjob_owner(job_id)}",
            # the operator submits over HTTP to the head (allowed by the NetworkPolicy): no
            # submitter pod
            "submissionMode": "HTTPMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "activeDeadlineSeconds": t.rayjob_deadline_s,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": _pod(t.rayjob_image, "ray-head", {"cpu": "1", "memory": "4Gi"}),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "train",
                        "replicas": spec.workers,
                        "minReplicas": spec.workers,
                        "maxReplicas": spec.workers,
                        "rayStartParams": {"num-cpus": f"{int(t.cpus_per_worker)}"},
                        "template": worker_pod,
                    }
                ],
            },
        },
    }


class KubeApi:
    """A minimal Kubernetes API client for one namespace's RayJobs (service account auth)."""

    def __init__(
        self, base_url: str, namespace: str, token: str | None, ca_file: str | None = None
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url, self.namespace, self.token = base_url.rstrip("/"), namespace, token
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    @classmethod
    def in_cluster(cls, namespace: str | None = None) -> KubeApi:
        """From the pod's environment and service account files."""
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        ns = namespace or (SA_DIR / "namespace").read_text().strip()
        return cls(
            f"https://{host}:{port}",
            ns,
            (SA_DIR / "token").read_text().strip(),
            str(SA_DIR / "ca.crt"),
        )

    def _url(self, name: str | None = None) -> str:
        url = f"{self.base_url}/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs"
        return f"{url}/{name}" if name else url

    def _call(self, method: str, url: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310  # checked
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFoundError(f"no RayJob at {url}") from None
            if exc.code == 409:
                raise ConflictError(f"RayJob exists: {url}") from None
            raise StorageError(f"Kubernetes API {exc.code} on {method} {url}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise StorageError(f"Kubernetes API unreachable: {exc}") from None

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create a RayJob."""
        out: dict[str, Any] = self._call("POST", self._url(), manifest)
        return out

    def get(self, name: str) -> dict[str, Any]:
        """A RayJob with its status."""
        out: dict[str, Any] = self._call("GET", self._url(name))
        return out

    def delete(self, name: str) -> None:
        """Delete a RayJob and, with it, its cluster (absent is fine)."""
        with contextlib.suppress(NotFoundError):
            self._call("DELETE", self._url(name), {"propagationPolicy": "Foreground"})


class RayJobLauncher:
    """Start, watch and stop jobs as RayJobs (the runner's ``rayjob`` launcher). The API
    server is asked how a run goes every ``check_s`` at most."""

    def __init__(
        self, settings: RefitSettings, api: KubeApi | None = None, check_s: float = 5.0
    ) -> None:
        self.settings = settings
        self.api = api or KubeApi.in_cluster(settings.training.rayjob_namespace)
        self.check_s = check_s
        self.next_check: dict[str, float] = {}  # job id -> when to ask the API server next
        self.stopped: set[str] = set()

    def claim(self, job_id: str) -> str:
        """The RayJob's entrypoint holds the lease under the RayJob's name."""
        return rayjob_owner(job_id)

    def unclaim(self, job_id: str) -> None:
        """Nothing was set aside."""

    def start(self, job_id: str, spec: dict[str, Any], owner: str) -> None:
        """Create the job's RayJob (an existing one - a runner restart - is kept)."""
        parsed = parse_spec(spec, self.settings.training)
        with contextlib.suppress(ConflictError):
            self.api.create(rayjob_manifest(job_id, parsed, self.settings))
        self.next_check[job_id] = time.monotonic() + self.check_s
        self.stopped.discard(job_id)

    def ended(self, job_id: str) -> str | None:
        """``None`` while the RayJob runs; else why it ended (``SUCCEEDED``, ``FAILED`` or
        the deployment status, e.g. ``Failed`` after a deadline; ``missing`` if deleted)."""
        try:
            status = self.api.get(rayjob_name(job_id)).get("status") or {}
        except NotFoundError:
            return "missing"
        job_status = status.get("jobStatus")
        if job_status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            return str(job_status)
        deployment = status.get("jobDeploymentStatus")
        if deployment in {"Failed", "Complete"}:
            return str(deployment)
        return None

    def poll(self, job_id: str) -> RunEnd | None:
        """The RayJob's end (a deleted one's at once); its entrypoint recorded the job's."""
        if job_id in self.stopped:
            why: str | None = "deleted on cancel"
        else:
            if time.monotonic() < self.next_check.get(job_id, 0.0):
                return None
            self.next_check[job_id] = time.monotonic() + self.check_s
            why = self.ended(job_id)
            if why is None:
                return None
        self.forget(job_id)
        return RunEnd(f"RayJob ended: {why}")

    def stop(self, job_id: str) -> None:
        """Delete the job's RayJob and its cluster."""
        self.api.delete(rayjob_name(job_id))
        self.stopped.add(job_id)

    def forget(self, job_id: str) -> None:
        """Nothing of the run is held here but its schedule."""
        self.next_check.pop(job_id, None)
        self.stopped.discard(job_id)

    def owns(self, job_id: str, owner: str | None) -> bool:
        """The job's own RayJob: a restarted runner keeps it and follows it again."""
        return owner == rayjob_owner(job_id)

    def clear(self, job_id: str, owner: str | None) -> None:
        """A RayJob is started again under its name (kept when it still exists)."""

    def idle(self, running: int) -> None:
        """No warm clusters: a RayJob's cluster exists for its job only."""

    def stats(self) -> dict[str, Any]:
        """Nothing held between jobs."""
        return {}

    def close(self) -> None:
        """Nothing held between jobs."""


__all__ = ["KubeApi", "RayJobLauncher", "rayjob_manifest", "rayjob_name", "rayjob_owner"]
