"""``POST /v1/variants/predict`` over HTTP (in-process app, real SeaweedFS): several models
answer the same images, each as its own predict route would, in one decode and, for the
versions that share their trunk, one trunk pass; mistakes get a 4xx naming the field."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import torch

from api_app import METRICS, PREDICT, build_inprocess_app
from conftest import png_bytes
from service.settings import RefitSettings
from training.backbones import build_backbone
from training.preprocessing_spec import Preprocessing
from training.stage_digests import split_stages

PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def app_and_parts(module_settings: RefitSettings) -> Iterator[tuple[Any, dict[str, Any]]]:
    app, parts = build_inprocess_app(module_settings, publish=False)
    torch.manual_seed(5)
    base = build_backbone("resnet18", num_classes=3).eval().state_dict()
    variants = {
        "shop-a": base,
        "shop-b": dict(base, **{"fc.weight": base["fc.weight"].flip(0)}),
        "shop-c": dict(base, **{"layer4.1.bn2.bias": base["layer4.1.bn2.bias"] + 0.2}),
    }
    reg = parts["registry"]
    for name, state in variants.items():
        m = reg.publish(
            split_stages(state, "resnet18", 3),
            model=name,
            backbone="resnet18",
            num_classes=3,
            class_names=["a", "b", "c"],
            preprocessing=PRE,
        )
        reg.set_alias(name, "production", m.version)
    yield app, parts
    parts["close"]()
    for follower in list(parts["plane"].predictor.host.followers.values()):
        follower.stop()  # no poll of a store that the session stops later


@pytest.fixture
async def client(app_and_parts: tuple[Any, dict[str, Any]]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_and_parts[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://refit") as c:
        yield c


def _body(models: list[str], n: int = 2, **extra: Any) -> dict[str, Any]:
    images = [base64.b64encode(png_bytes(i, seed=i)).decode() for i in range(n)]
    return {"models": models, "images": images, "top_k": 3, **extra}


AUTH = {"Authorization": f"Bearer {PREDICT}"}


def _scores(answer: dict[str, Any]) -> list[list[tuple[str, float]]]:
    return [[(r["label"], r["score"]) for r in image] for image in answer["predictions"]]


@pytest.mark.anyio
async def test_every_model_answers_as_its_own_route(client: httpx.AsyncClient) -> None:
    models = ["shop-a", "shop-b", "shop-c"]
    before = (await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})).text
    r = await client.post("/v1/variants/predict", json=_body(models), headers=AUTH)
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert [a["model"] for a in answers] == models
    assert len({a["prediction_id"] for a in answers}) == 3
    body = _body(models)
    for answer in answers:
        alone = await client.post(
            f"/v1/models/{answer['model']}/predict",
            json={"images": body["images"], "top_k": 3},
            headers=AUTH,
        )
        assert alone.json()["model_version"] == answer["model_version"]
        for got, want in zip(_scores(answer), _scores(alone.json()), strict=True):
            assert [g[0] for g in got] == [w[0] for w in want]
            assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-5)
    assert _scores(answers[0]) != _scores(answers[1])  # one trunk, their own heads
    after = (await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})).text

    def shared(text: str) -> float:
        name = "refit_batches_shared_trunk_total"
        return float(next(x for x in text.splitlines() if x.startswith(name)).split()[-1])

    assert shared(after) >= shared(before) + 1  # shop-a and shop-b: one trunk pass
    # what each holds together with the others, and the replica's memory
    listing = (await client.get("/v1/models", headers=AUTH)).json()["models"]
    serving = {m["name"]: m.get("serving") or {} for m in listing}
    trunk_stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert serving["shop-a"]["shared_stages"] == []  # loaded first
    assert serving["shop-b"]["shared_stages"] == trunk_stages  # its head alone its own
    assert serving["shop-c"]["shared_stages"] == trunk_stages[:-1]  # and its layer4
    assert serving["shop-b"]["model_bytes"] > serving["shop-b"]["shared_bytes"] > 0

    def gauge(text: str, kind: str) -> float:
        name = f'refit_classifier_model_bytes{{kind="{kind}"}}'
        return float(next(x for x in text.splitlines() if x.startswith(name)).split()[-1])

    shared_total = sum(serving[m]["shared_bytes"] for m in ("shop-a", "shop-b", "shop-c"))
    assert gauge(after, "separate") == sum(serving[m]["model_bytes"] for m in serving)
    assert gauge(after, "resident") == gauge(after, "separate") - shared_total


@pytest.mark.anyio
async def test_fan_out_mistakes_name_their_field(client: httpx.AsyncClient) -> None:
    cases = [
        (_body(["shop-a", "shop-a"]), 400, "models"),
        (_body([]), 400, "models"),
        (_body(["../etc"]), 400, "models[0]"),
        (_body(["shop-a"], top_k=999), 400, "top_k"),
        ({"models": ["shop-a"], "images": ["%%%"]}, 400, "images[0]"),
        (_body(["shop-a"], extra=1), 400, "extra"),
        (_body([f"m{i}" for i in range(17)]), 400, "models"),
    ]
    for body, status, field in cases:
        r = await client.post("/v1/variants/predict", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["field"] == field, r.text
    r = await client.post("/v1/variants/predict", json=_body(["shop-a", "nobody"]), headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "model"
    assert (await client.post("/v1/variants/predict", json=_body(["shop-a"]))).status_code == 401
    r = await client.post(
        "/v1/variants/predict", content=b"x", headers={**AUTH, "content-type": "text/plain"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "content-type"
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/variants/predict" in schema["paths"]
    assert "FanOutRequest" in schema["components"]["schemas"]
