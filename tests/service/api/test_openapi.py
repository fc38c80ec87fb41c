"""The API is its schemas: ``/openapi.json`` declares every request body and security scheme,
and schemathesis, generating requests from it, never gets a server error from the real app
(in process, over a real SeaweedFS and real tiny models)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api_app import ADMIN, build_inprocess_app
from conftest import write_imagefolder
from service.api.predict_v1 import EXAMPLE_IMAGE
from service.settings import RefitSettings

BODIES = {
    ("post", "/v1/models/{model}/predict"): {"application/json", "multipart/form-data"},
    ("post", "/v2/models/{model}/infer"): {"application/json", "application/octet-stream"},
    ("post", "/v2/models/{model}/versions/{version}/infer"): {
        "application/json",
        "application/octet-stream",
    },
    ("post", "/v1/models/{model}/promote"): {"application/json"},
    ("post", "/v1/models/{model}/rollback"): {"application/json"},
    ("post", "/v1/finetune-jobs"): {"application/json"},
    ("put", "/v1/models/{model}/capture"): {"application/json"},
    ("post", "/v1/models/{model}/feedback"): {"application/json"},
}


@pytest.fixture
def openapi(settings: RefitSettings) -> Iterator[dict[str, Any]]:
    app, parts = build_inprocess_app(settings)
    doc: dict[str, Any] = app.openapi()
    yield doc
    parts["close"]()  # its scheduler thread must not outlive the test's store


def test_every_body_and_scope_is_declared(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    for (method, path), types in BODIES.items():
        body = paths[path][method]["requestBody"]
        assert set(body["content"]) == types, path
    for path, ops in paths.items():
        for method, op in ops.items():
            # actions without parameters: cancel a job, snapshot a dataset
            if method == "post" and not path.endswith(("/cancel", "/feedback/dataset")):
                assert "requestBody" in op, f"{method} {path} declares no body"
    schemes = openapi["components"]["securitySchemes"]
    assert set(schemes) == {"adminToken", "labelToken", "metricsToken", "predictToken"}
    assert all(s == {"type": "http", "scheme": "bearer", **s} for s in schemes.values())
    scope = {
        ("get", "/v1/finetune-jobs"): "adminToken",
        ("post", "/v1/models/{model}/promote"): "adminToken",
        ("post", "/v1/models/{model}/predict"): "predictToken",
        ("post", "/v2/models/{model}/infer"): "predictToken",
        ("get", "/metrics"): "metricsToken",
        ("post", "/v1/models/{model}/feedback"): "labelToken",
        ("get", "/v1/models/{model}/feedback"): "adminToken",
        ("put", "/v1/models/{model}/capture"): "adminToken",
        ("get", "/v1/models/{model}/captures/{prediction_id}/{index}/image"): "adminToken",
    }
    for (method, path), name in scope.items():
        assert paths[path][method]["security"] == [{name: []}], path
    assert "security" not in paths["/healthz"]["get"]
    # every $ref resolves inside the document
    refs = _refs(openapi)
    assert refs
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in openapi["components"]["schemas"], ref


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return out.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _known_ids(parts: dict[str, Any]) -> dict[str, str]:
    """Path values that exist: the served model and version, a queued job. Generated cases
    that use them get past 404 to the route's real work."""
    version = parts["registry"].get_alias("digits", "production")[0].version
    store = parts["store"]
    uri = write_imagefolder(store, "tiny", classes=2, train=2, val=1)
    spec = {"model": "tiny", "base": {"backbone": "resnet18"}, "dataset": uri, "epochs": 1}
    job = parts["runner"].create(spec, None)["record"]["job_id"]
    return {"model": "digits", "version": version, "job_id": job, "dataset": uri}


def _run(case_strategy: Any, examples: int, outcome: dict[str, int]) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case_strategy)
    def run(case: Any) -> None:
        response = case.call(headers={"Authorization": f"Bearer {ADMIN}"})
        outcome[f"{response.status_code // 100}xx"] += 1
        case.validate_response(response, checks=[not_a_server_error])

    run()


def test_generated_requests_get_no_server_error(settings: RefitSettings) -> None:
    """Every operation: generated cases (random, and with the served model's name), and the
    documented examples. No 5xx; the share of 2xx per operation is printed (``-s``)."""
    app, parts = build_inprocess_app(settings, publish=True)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ids = _known_ids(parts)
    table = []
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            outcome = collections.Counter({"2xx": 0, "4xx": 0, "5xx": 0})
            known = {k: v for k, v in ids.items() if op.get_parameter(k, "path")}
            _run(op.as_strategy(), 15, outcome)
            if known:
                _run(op.as_strategy(path_parameters=known), 15, outcome)
            pinned = {  # bodies naming what exists: a version, a dataset
                "POST /v1/models/{model}/promote": {"version": ids["version"]},
                "POST /v1/variants/predict": {
                    "models": ["digits"],
                    "images": [EXAMPLE_IMAGE],
                    "top_k": 1,
                },
                "POST /v1/finetune-jobs": {
                    "model": "tiny",
                    "base": {"backbone": "resnet18"},
                    "dataset": ids["dataset"],
                },
            }.get(op.label)
            if pinned is not None:
                _run(op.as_strategy(path_parameters=known, body=pinned), 5, outcome)
            for strategy in op.get_strategies_from_examples(path_parameters=known):
                _run(strategy, 1, outcome)
            total = sum(outcome.values())
            table.append((op.label, total, outcome["2xx"] / max(1, total), outcome["4xx"]))
    finally:
        parts["close"]()
    print("\noperation | cases | 2xx share | 4xx")
    for label, total, share, client in table:
        print(f"{label} | {total} | {share:.2f} | {client}")
    assert len(table) == 35
    assert {t[0]: t[2] for t in table}["POST /v1/variants/predict"] > 0  # answers
