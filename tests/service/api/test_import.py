"""Bring your own weights over HTTP (in process, real SeaweedFS, real OpenVINO): an import
publishes a verified version that serves; weights that would not load get 422 naming what is
wrong, and nothing is published."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save

from api_app import ADMIN, PREDICT, build_inprocess_app
from conftest import png_bytes
from service.settings import RefitSettings
from training.backbones import build_backbone
from training.stage_digests import stage_digests

pytestmark = pytest.mark.anyio
PRE = {"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
META = {"backbone": "resnet18", "class_names": ["a", "b", "c"], "preprocessing": PRE}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def parts(module_settings: RefitSettings) -> Iterator[tuple[Any, dict[str, Any]]]:
    app, parts = build_inprocess_app(module_settings)
    yield app, parts
    parts["close"]()


@pytest.fixture
async def client(parts: tuple[Any, dict[str, Any]]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=parts[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://refit") as c:
        yield c


def _weights(num_classes: int = 3, **change: torch.Tensor) -> bytes:
    torch.manual_seed(0)
    state = build_backbone("resnet18", num_classes=num_classes).state_dict()
    state.update(change)
    return save({k: v.contiguous() for k, v in state.items()})


def _files(weights: bytes, images: int = 0) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("weights", ("w.safetensors", io.BytesIO(weights)))]
    for i in range(images):
        out.append(("calibration", (f"{i}.png", io.BytesIO(png_bytes(i % 3, seed=i)))))
    return out


async def _import(client: httpx.AsyncClient, model: str, meta: dict, files: list) -> Any:
    return await client.post(
        f"/v1/models/{model}/versions",
        headers={"Authorization": f"Bearer {ADMIN}"},
        data={"metadata": json.dumps(meta)},
        files=files,
    )


async def test_import_publishes_a_version_that_serves(client, parts) -> None:
    meta = {**META, "promote": "production", "source": "trained elsewhere"}
    r = await _import(client, "byo", meta, _files(_weights(), images=12))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["promoted"]["version"] == body["version"]
    # published and live first; its graphs come after, as the version's graph set
    assert body["graphs_pending"] == ["openvino", "int8"]
    registry = parts[1]["registry"]
    manifest, _ = registry.load("byo", body["version"])  # every sha256 verified
    assert manifest.dataset["source"] == "trained elsewhere"
    assert manifest.graphs == {}
    await parts[1]["plane"].graphs_settled()
    assert registry.has_graph_set("byo", body["version"])
    with_graphs = registry.with_graph_set(manifest)
    assert "graphs/int8.bin" in with_graphs.files
    admin = {"Authorization": f"Bearer {ADMIN}"}
    detail = await client.get(f"/v1/models/byo/versions/{body['version']}", headers=admin)
    assert detail.status_code == 200, detail.text
    assert set(detail.json()["graphs"]) == {"openvino", "int8"}
    assert detail.json()["graphs"]["openvino"]["images"] == 9  # a quarter held out
    assert detail.json()["class_names"] == META["class_names"]
    # the content identity of each stage, recorded at publish
    torch.manual_seed(0)
    uploaded = build_backbone("resnet18", num_classes=3).state_dict()
    expected = [(d.name, d.sha256) for d in stage_digests(uploaded, "resnet18", 3)]
    stages = detail.json()["stages"]
    assert [(d["name"], d["sha256"]) for d in stages] == expected
    assert [d[0] for d in expected] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    # stored stage by stage, each in a file of its own under the version
    assert {(d["file"]["model"], d["file"]["version"]) for d in stages} == {
        ("byo", body["version"])
    }
    missing = await client.get("/v1/models/byo/versions/v999", headers=admin)
    assert missing.status_code == 404
    assert missing.json()["error"]["field"] == "version"
    answer = await client.post(
        "/v1/models/byo/predict",
        headers={"Authorization": f"Bearer {PREDICT}"},
        files=[("images", ("x.png", png_bytes(1), "image/png"))],
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == body["version"]


@pytest.mark.parametrize(
    ("meta", "weights", "status", "field", "words"),
    [
        (
            META,
            _weights(4),
            422,
            "weights",
            "fc.bias is torch.float32 [4], needs torch.float32 [3]",
        ),
        (META, _weights(**{"extra.bias": torch.zeros(3)}), 422, "weights", "1 unexpected tensors"),
        (META, _weights(**{"fc.bias": torch.zeros(3).half()}), 422, "weights", "float16"),
        (META, b"\x80\x04pickle", 422, "weights", "not a safetensors file"),
        ({**META, "backbone": "resnet9000"}, _weights(), 422, "backbone", "unknown backbone"),
        # the metadata's own schema: a malformed body, like any other (400)
        ({**META, "class_names": ["a", "a"]}, _weights(), 400, "metadata.class_names", "unique"),
        ({**META, "extra": 1}, _weights(), 400, "metadata.extra", "Extra inputs"),
    ],
)
async def test_weights_that_would_not_load_get_422_and_publish_nothing(
    client, parts, meta: dict, weights: bytes, status: int, field: str, words: str
) -> None:
    r = await _import(client, "refused", meta, _files(weights))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"].startswith(field), error
    assert words in error["message"], error
    assert parts[1]["registry"].list_versions("refused") == []


async def test_import_needs_admin_and_names_a_bad_calibration_image(client, parts) -> None:
    r = await client.post(
        "/v1/models/byo2/versions",
        headers={"Authorization": f"Bearer {PREDICT}"},
        data={"metadata": json.dumps(META)},
        files=_files(_weights()),
    )
    assert r.status_code == 403
    files = [*_files(_weights(), images=2), ("calibration", ("bad.png", io.BytesIO(b"junk")))]
    r = await _import(client, "byo2", META, files)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "calibration[2]"
    assert parts[1]["registry"].list_versions("byo2") == []
