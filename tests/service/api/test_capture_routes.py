"""Capture over HTTP, in process (a real SeaweedFS, a real tiny model in an in-process
ModelHost): prediction ids on every answer, policies through the admin API, captured images
stored off the request path and readable with the admin token only."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest

from api_app import ADMIN, PREDICT, bearer
from conftest import png_bytes
from training.storage.captures import CapturePolicy, Captures
from training.storage.ids import is_prediction_id

pytestmark = pytest.mark.anyio


async def _predict(published_client: httpx.AsyncClient, *images: bytes) -> httpx.Response:
    body = {"images": [base64.b64encode(i).decode() for i in images]}
    return await published_client.post(
        "/v1/models/digits/predict", json=body, headers=bearer(PREDICT)
    )


def _tap(parts: dict[str, Any]) -> Any:
    tap = parts["plane"].predictor.host.capture
    assert tap is not None
    return tap


async def _flush(parts: dict[str, Any]) -> None:
    assert await asyncio.to_thread(_tap(parts).flush)


async def test_every_answer_has_a_prediction_id(published_client: httpx.AsyncClient) -> None:
    r = await _predict(published_client, png_bytes(0), png_bytes(1))
    assert r.status_code == 200
    pid = r.json()["prediction_id"]
    assert is_prediction_id(pid)
    assert r.headers["X-Prediction-Id"] == pid
    again = (await _predict(published_client, png_bytes(0))).json()["prediction_id"]
    assert again != pid
    infer = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(png_bytes(2)).decode()],
                "parameters": {"content_type": "base64"},
            }
        ]
    }
    r = await published_client.post("/v2/models/digits/infer", json=infer, headers=bearer(PREDICT))
    assert r.status_code == 200, r.text
    assert is_prediction_id(r.json()["parameters"]["prediction_id"])
    assert r.headers["X-Prediction-Id"] == r.json()["parameters"]["prediction_id"]


async def test_capture_is_off_by_default(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    r = await published_client.get("/v1/models/digits/capture", headers=bearer(ADMIN))
    assert r.status_code == 200
    assert r.json()["source"] == "default"
    assert r.json()["enabled"] is False
    await _predict(published_client, png_bytes(0))
    await _flush(published_app[1])
    listed = await published_client.get("/v1/models/digits/captures", headers=bearer(ADMIN))
    assert listed.json()["captures"] == []


async def test_a_policy_captures_images_readable_with_the_admin_token_only(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    parts = published_app[1]
    policy = {"rate": 1.0, "max_per_hour": 100, "max_per_class_per_hour": None}
    r = await published_client.put("/v1/models/digits/capture", json=policy, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "stored"
    tap = _tap(parts)
    tap.policy("digits")  # the writer thread reads the stored policy
    await _flush(parts)
    images = [png_bytes(0), png_bytes(1, seed=3)]
    pid = (await _predict(published_client, *images)).json()["prediction_id"]
    await _flush(parts)
    listed = (
        await published_client.get("/v1/models/digits/captures", headers=bearer(ADMIN))
    ).json()
    assert listed["captures"] == [
        {"prediction_id": pid, "index": 0},
        {"prediction_id": pid, "index": 1},
    ]
    record = await published_client.get(
        f"/v1/models/digits/captures/{pid}/1", headers=bearer(ADMIN)
    )
    assert record.status_code == 200
    body = record.json()
    assert body["reason"] == "random"
    assert body["image"] == "png"
    assert body["version"]
    assert len(body["predictions"]) == 3
    image = await published_client.get(
        f"/v1/models/digits/captures/{pid}/1/image", headers=bearer(ADMIN)
    )
    assert image.content == images[1]
    assert image.headers["content-type"] == "image/png"
    for path in (
        "/v1/models/digits/captures",
        f"/v1/models/digits/captures/{pid}/0",
        f"/v1/models/digits/captures/{pid}/0/image",
        "/v1/models/digits/capture",
    ):
        assert (await published_client.get(path)).status_code == 401, path
        assert (await published_client.get(path, headers=bearer(PREDICT))).status_code == 403, path
    assert tap.counts[("digits", "stored")] == 2


async def test_capture_mistakes_get_4xx_naming_the_field(
    published_client: httpx.AsyncClient,
) -> None:
    admin = bearer(ADMIN)
    bad = await published_client.put("/v1/models/digits/capture", json={"rate": 2}, headers=admin)
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "rate"
    extra = await published_client.put(
        "/v1/models/digits/capture", json={"rat": 0.1}, headers=admin
    )
    assert extra.status_code == 400
    assert extra.json()["error"]["field"] == "rat"
    unknown = await published_client.put(
        "/v1/models/nosuch/capture", json={"rate": 0.1}, headers=admin
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["field"] == "model"
    r = await published_client.get("/v1/models/digits/captures/not-an-id/0", headers=admin)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "prediction_id"
    missing = "20261203-061500123-0123456789ab"
    r = await published_client.get(f"/v1/models/digits/captures/{missing}/0", headers=admin)
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "prediction_id"
    r = await published_client.get("/v1/models/digits/captures?after=../x", headers=admin)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "after"


async def test_a_stored_policy_applies_from_the_first_prediction_a_replica_serves(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    """A policy stored before this replica served the model (another replica's PUT, or a
    restarted service): the model's first prediction here is captured under it."""
    parts = published_app[1]
    policy = CapturePolicy(rate=1.0, max_per_hour=100, max_per_class_per_hour=None)
    await asyncio.to_thread(Captures(parts["store"]).set_policy, "digits", policy)
    pid = (await _predict(published_client, png_bytes(0))).json()["prediction_id"]
    await _flush(parts)
    listed = (
        await published_client.get("/v1/models/digits/captures", headers=bearer(ADMIN))
    ).json()
    assert listed["captures"] == [{"prediction_id": pid, "index": 0}]
