"""The layering rules, checked on the source (every import statement, at any depth): a rule
that only a convention keeps is broken by the first hurried change.

* ``training`` never imports ``service`` (the library does not know the application);
* FastAPI (and Starlette) only under ``service/api/``; ``ray.serve`` only in
  ``service/deployments.py``; ``ray.train`` only in ``training/ray_train.py``; boto3 (and
  botocore) only in ``training/storage/s3.py``;
* ``service/dataplane/`` (the API's use cases) and ``service/runtime/`` (what runs in a
  replica: served models, hot-load, the lane, decoding, drift, the capture tap) import neither
  Ray nor FastAPI (they run in a test without either); the job runner
  (``service/control/scheduler.py``, ``launchers.py``) imports no Ray;
* the layers point one way: ``api`` -> ``dataplane`` -> ``runtime``; the runtime imports no
  use case or route, the use cases no route;
* ``training/storage/`` imports the standard library, pydantic and itself, and the few
  pydantic-level modules named below; the exceptions left are listed with the issue that
  removes them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)

STORAGE_MAY_IMPORT = {
    "pydantic",
    "training.storage",
    "training.freeze_spec",
    "training.preprocessing_spec",
}
STORAGE_EXCEPTIONS = {
    # the one module that talks to S3
    "training/storage/s3.py": {"boto3", "botocore", "pyarrow"},
    # loads weights (tensors) for its callers
    "training/storage/registry.py": {"torch", "safetensors"},
    # the registry's weights, stage by stage
    "training/storage/stage_files.py": {"torch", "safetensors"},
}


def imports_of(source: str) -> Iterator[tuple[int, str]]:
    """Every module a source imports, with its line: ``import a.b`` gives ``a.b``; ``from a
    import b`` gives ``a`` and ``a.b`` (``from ray import serve`` is an import of
    ``ray.serve``). Relative imports are none here."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(path: str, source: str) -> list[str]:
    """The rules a file breaks (``path`` relative to the repository)."""
    found: list[str] = []
    for line, module in imports_of(source):

        def broke(rule: str, line: int = line, module: str = module) -> None:
            found.append(f"{path}:{line} imports {module}: {rule}")

        top = module.split(".")[0]
        if path.startswith("training/") and top == "service":
            broke("training never imports service")
        if top in {"fastapi", "starlette"} and not path.startswith("service/api/"):
            broke("FastAPI only in service/api/")
        if _within(module, "ray.serve") and path != "service/deployments.py":
            broke("ray.serve only in service/deployments.py")
        if _within(module, "ray.train") and path != "training/ray_train.py":
            broke("ray.train only in training/ray_train.py")
        if top in {"boto3", "botocore"} and path != "training/storage/s3.py":
            broke("boto3 only in training/storage/s3.py")
        if path.startswith("service/runtime/") and any(
            _within(module, p) for p in ("service.dataplane", "service.api", "service.control")
        ):
            broke("the runtime imports no use case, route or control plane")
        if path.startswith("service/dataplane/") and _within(module, "service.api"):
            broke("the use cases import no route")
        ray_free = path.startswith(("service/dataplane/", "service/runtime/")) or path in {
            "service/control/scheduler.py",
            "service/control/launchers.py",
        }
        if ray_free and top in {"ray", "fastapi", "starlette"}:
            broke("the data plane and the job runner import neither Ray nor FastAPI")
        if path.startswith("training/storage/") and top not in STDLIB and top != "__future__":
            allowed = STORAGE_MAY_IMPORT | STORAGE_EXCEPTIONS.get(path, set())
            if not any(_within(module, a) for a in allowed):
                broke("storage imports the standard library, pydantic and itself")
    return found


def _sources() -> Iterator[tuple[str, str]]:
    for package in ("service", "training"):
        for file in sorted((ROOT / package).rglob("*.py")):
            yield file.relative_to(ROOT).as_posix(), file.read_text()


def test_the_code_keeps_the_layering_rules() -> None:
    broken = [v for path, source in _sources() for v in violations(path, source)]
    assert broken == []


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        ("training/finetune.py", "from service.settings import RefitSettings", "never imports"),
        ("service/cli/main.py", "def f():\n    from fastapi import FastAPI", "FastAPI only"),
        ("service/app.py", "from ray import serve", "ray.serve only"),
        ("training/worker.py", "import ray.train.torch", "ray.train only"),
        ("service/dataplane/jobs.py", "import boto3", "boto3 only"),
        ("service/runtime/hotload.py", "import ray", "neither Ray"),
        ("service/control/scheduler.py", "from ray.util import placement_group", "neither Ray"),
        ("service/dataplane/quality.py", "import ray", "neither Ray"),
        ("service/runtime/model_host.py", "from service.dataplane import jobs", "the runtime"),
        ("service/dataplane/jobs.py", "from service.api.params import Plane", "no route"),
        ("training/storage/feedback.py", "import torch", "storage imports"),
        ("training/storage/captures.py", "from training.data import Sample", "storage imports"),
    ],
)
def test_a_deliberate_violation_is_caught(path: str, source: str, rule: str) -> None:
    found = violations(path, source)
    assert found, f"{source!r} in {path} passed"
    assert rule in found[0]


def test_the_registry_imports_no_torchvision() -> None:
    """Every registry user (the job runner's actor, the CLI) reads manifests, whose
    preprocessing is pydantic only: torchvision (and its CUDA-built import shim) stays out."""
    code = "import sys, training.storage.registry; print('torchvision' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_each_class_name_is_defined_once() -> None:
    """One name per thing: two classes of one name (an API ``Label`` and a use case's) make
    every import and every OpenAPI schema name ambiguous."""
    where: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("training/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


@pytest.mark.parametrize(
    "package",
    [
        "service",
        "service/api",
        "service/dataplane",
        "service/runtime",
        "service/control",
        "service/cli",
        "training",
        "training/storage",
    ],
)
def test_a_package_docstring_names_every_module(package: str) -> None:
    """The map at the top of each package stays true: every module is named in it."""
    init = ROOT / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
    assert [m for m in modules if f"``{m}``" not in doc] == []
