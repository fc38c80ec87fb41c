"""Feedback over HTTP, in process (a real SeaweedFS, a real tiny model): labels for captured
predictions or uploaded images, the label scope, bad input named, content-hash dedup, a
stable split, and the dataset a fine-tune spec names (read back by the data loader)."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from api_app import ADMIN, LABEL, METRICS, PREDICT, bearer, build_inprocess_app
from conftest import inverted_png, png_bytes
from service.settings import DriftSettings, RefitSettings
from training.data import index_dataset
from training.storage.feedback import split_of

pytestmark = pytest.mark.anyio


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _label(
    published_client: httpx.AsyncClient, token: str = LABEL, **body: Any
) -> httpx.Response:
    return await published_client.post(
        "/v1/models/digits/feedback", json=body, headers=bearer(token)
    )


async def test_a_label_for_a_captured_prediction(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    parts = published_app[1]
    policy = {"rate": 1.0, "max_per_class_per_hour": None}
    assert (
        await published_client.put("/v1/models/digits/capture", json=policy, headers=bearer(ADMIN))
    ).status_code == 200
    tap = parts["plane"].predictor.host.capture
    tap.policy("digits")
    assert await asyncio.to_thread(tap.flush)
    body = {"images": [_b64(png_bytes(0)), _b64(png_bytes(2, seed=5))]}
    pred = await published_client.post(
        "/v1/models/digits/predict", json=body, headers=bearer(PREDICT)
    )
    pid = pred.json()["prediction_id"]
    assert await asyncio.to_thread(tap.flush)
    r = await _label(published_client, prediction_id=pid, index=1, label="c")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["predicted"] == pred.json()["predictions"][1][0]["label"]
    assert out["split"] == split_of(out["sha256"], 0.2)
    assert out["previous_label"] is None
    again = await _label(published_client, prediction_id=pid, index=1, label="b")
    assert again.json()["previous_label"] == "c"  # the same content: one item, relabelled
    unknown = await _label(
        published_client, prediction_id="20261203-061500123-0123456789ab", label="a"
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["field"] == "prediction_id"
    overview = await published_client.get("/v1/models/digits/feedback", headers=bearer(ADMIN))
    assert overview.json()["labels"] == 1
    q = await published_client.get("/v1/models/digits/quality", headers=bearer(ADMIN))
    assert q.status_code == 200, q.text
    report = q.json()
    version = pred.json()["model_version"]
    right = out["predicted"] == "b"  # the latest label of that image is b
    assert report["labels"] == 1
    assert report["last"]["accuracy"] == float(right)
    assert report["versions"][version]["confusion"] == {"b": {out["predicted"]: 1}}
    assert len(report["hours"]) == 1
    png = await published_client.get("/v1/models/digits/quality.png", headers=bearer(ADMIN))
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert (
        await published_client.get("/v1/models/digits/quality", headers=bearer(LABEL))
    ).status_code == 403
    metrics = await published_client.get("/metrics", headers=bearer(METRICS))
    # two labels were sent for that image (c, then b): each is counted against the prediction
    outcomes = collections.Counter(
        "correct" if out["predicted"] == label else "wrong" for label in ("c", "b")
    )
    for outcome, n in outcomes.items():
        line = f'refit_feedback_labels_total{{model="digits",outcome="{outcome}"}} {float(n)}'
        assert line in metrics.text
    assert 'refit_predictions_total{confidence="' in metrics.text


async def test_uploaded_images_dedup_and_become_a_dataset(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    store = published_app[1]["store"]
    images = {f"{c}{i}": png_bytes(k, seed=i) for k, c in enumerate("abc") for i in range(6)}
    for name, data in images.items():
        r = await _label(published_client, image=_b64(data), label=name[0])
        assert r.status_code == 200, r.text
    dup = await _label(published_client, image=_b64(images["a0"]), label="a")
    assert dup.json()["previous_label"] == "a"
    new = await _label(
        published_client, image=_b64(png_bytes(4, seed=99)), label="d", new_class=True
    )
    assert new.json()["new_class"] is True
    overview = await published_client.get("/v1/models/digits/feedback", headers=bearer(ADMIN))
    assert overview.json()["classes_left_out"] == ["d"]  # before a snapshot, too
    r = await published_client.post("/v1/models/digits/feedback/dataset", headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["labels"] == len(images)
    assert out["classes_left_out"] == ["d"]  # one image: cannot be in both splits
    assert out["dataset"].endswith("/datasets/feedback-digits.jsonl")
    index = await asyncio.to_thread(index_dataset, store, out["dataset"])
    assert index.layout == "jsonl"
    assert index.split == "given"  # the stored splits, not a new random one
    assert len(index.train) + len(index.val) == len(images)
    assert set(index.classes) == {"a", "b", "c"}
    again = (
        await published_client.post("/v1/models/digits/feedback/dataset", headers=bearer(ADMIN))
    ).json()
    assert again["per_split"] == out["per_split"]  # stable


async def test_feedback_mistakes_and_scopes(published_client: httpx.AsyncClient) -> None:
    img = _b64(png_bytes(0))
    not_a_class = await _label(published_client, image=img, label="zebra")
    assert not_a_class.status_code == 400
    assert not_a_class.json()["error"]["field"] == "label"
    both = await _label(
        published_client, image=img, prediction_id="20261203-061500123-0123456789ab", label="a"
    )
    assert both.status_code == 400
    neither = await _label(published_client, label="a")
    assert neither.status_code == 400
    broken = await _label(published_client, image=_b64(b"\x89PNG not really"), label="a")
    assert broken.status_code == 422
    assert broken.json()["error"]["field"] == "image"
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert (
        await _label(published_client, image=_b64(gif.getvalue()), label="a")
    ).status_code == 415
    huge = io.BytesIO()
    Image.new("RGB", (9000, 9000)).save(huge, "PNG")
    too_big = await _label(published_client, image=_b64(huge.getvalue()), label="a")
    assert too_big.status_code == 413
    unknown = await published_client.post(
        "/v1/models/nosuch/feedback", json={"image": img, "label": "a"}, headers=bearer(LABEL)
    )
    assert unknown.status_code == 404
    assert (await _label(published_client, token=PREDICT, image=img, label="a")).status_code == 403
    assert (await _label(published_client, token=METRICS, image=img, label="a")).status_code == 403
    assert (await _label(published_client, token="wrong", image=img, label="a")).status_code == 401
    assert (await _label(published_client, token=ADMIN, image=img, label="a")).status_code == 200
    for path in ("/v1/models/digits/feedback", "/v1/models/digits/capture"):
        assert (await published_client.get(path, headers=bearer(LABEL))).status_code == 403, path


async def test_quality_and_metrics_show_the_serving_versions_drift(
    settings: RefitSettings,
) -> None:
    every = settings.model_copy(update={"drift": DriftSettings(sample_rate=1.0, flush_s=3600)})
    app, parts = build_inprocess_app(every, publish=True)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://refit") as client:
            q = await client.get("/v1/models/digits/quality", headers=bearer(ADMIN))
            assert q.json()["drift"] is None  # nothing measured yet
            like = [png_bytes(i % 3, seed=700 + i) for i in range(6)]
            inverted = [inverted_png(png_bytes(i % 3, seed=800 + i)) for i in range(6)]
            for images in (like, inverted):
                body = {"images": [_b64(x) for x in images]}
                r = await client.post(
                    "/v1/models/digits/predict", json=body, headers=bearer(PREDICT)
                )
                assert r.status_code == 200, r.text
            monitor = parts["plane"].predictor.host.drift
            assert await asyncio.to_thread(monitor.flush)
            q = await client.get("/v1/models/digits/quality", headers=bearer(ADMIN))
            drift = q.json()["drift"]
            assert drift["version"] == r.json()["model_version"]
            assert drift["samples"] == 12
            assert drift["expected"] == pytest.approx(0.05)
            assert drift["outliers"] >= 6  # the inverted half
            metrics = await client.get("/metrics", headers=bearer(METRICS))
            assert 'refit_drift_score{model="digits"}' in metrics.text
            line = 'refit_drift_samples_total{model="digits",outcome="measured"} 12.0'
            assert line in metrics.text
    finally:
        parts["close"]()
