"""The Serve app end to end over HTTP (real Ray Serve proxy, real SeaweedFS)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import png_bytes
from PIL import Image

from service.images import decode_request_images
from training.backbones import build_backbone
from training.preprocess import Preprocessing
from training.registry import Registry
from training.seaweed import Connection
from training.settings import RefitSettings, ServeSettings
from training.store import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
PREDICT, ADMIN = "predict-token-x", "admin-token-y"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def publish(reg: Registry, name: str, *, promote: bool = True) -> str:
    net = build_backbone("resnet18", num_classes=3)
    calib = decode_request_images(
        [png_bytes(i % 3, seed=i) for i in range(6)],
        max_image_bytes=10**6,
        max_pixels=10**6,
        preprocessing=PRE,
    )
    m = reg.publish(
        net.state_dict(),
        model=name,
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=PRE,
        calibration=calib,
    )
    if promote:
        reg.set_alias(name, "production", m.version)
    return m.version


@pytest.fixture(scope="module")
def app(seaweed: Connection) -> Iterator[dict[str, Any]]:
    from service import deployments

    settings = RefitSettings(
        s3=seaweed.s3_settings(prefix=f"serve-{uuid.uuid4().hex[:8]}"),
        serve=ServeSettings(
            port=_free_port(),
            predict_token=PREDICT,
            admin_token=ADMIN,
            max_body_bytes=400_000,
            poll_interval_s=0.5,
            classifier_cpus=1,
        ),
    )
    reg = Registry(ObjectStore(settings.s3))
    v1 = publish(reg, "digits")
    publish(reg, "unpromoted", promote=False)
    deployments.run(settings)
    url = f"http://127.0.0.1:{settings.serve.port}"
    try:
        yield {"url": url, "reg": reg, "v1": v1}
    finally:
        deployments.shutdown()


def _post(app: dict[str, Any], model: str, *, token: str | None = PREDICT, **kw: Any):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(
        f"{app['url']}/v1/models/{model}/predict", headers=headers, timeout=60, **kw
    )


def _b64(*images: bytes) -> list[str]:
    return [base64.b64encode(i).decode() for i in images]


def test_predict_json_and_multipart(app: dict[str, Any]) -> None:
    r = _post(app, "digits", json={"images": _b64(png_bytes(0), png_bytes(1)), "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits"
    assert body["model_version"] == app["v1"]
    assert r.headers["x-model-version"] == app["v1"]
    assert [len(p) for p in body["predictions"]] == [2, 2]
    assert body["predictions"][0][0]["label"] in {"a", "b", "c"}
    files = [("files", ("x.png", png_bytes(2), "image/png"))]
    r = _post(app, "digits", files=files, data={"top_k": "1"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]) == 1


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"images": _b64(png_bytes(0), b"garbage")}}, 422, "images[1]"),
        ({"json": {"images": ["***not base64***"]}}, 400, "images[0]"),
        ({"json": {"images": _b64(_gif())}}, 415, "images[0]"),
        ({"json": {"images": _b64(png_bytes(0)), "top_k": 0}}, 400, "top_k"),
        ({"json": {"images": []}}, 400, "images"),
        ({"json": {"images": _b64(png_bytes(0)), "extra": 1}}, 400, "extra"),
        ({"data": b"x" * 500_000, "headers": {"Content-Type": "application/json"}}, 413, "body"),
        ({"data": b"{", "headers": {"Content-Type": "application/json"}}, 400, "body"),
        ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 400, "content-type"),
    ],
)
def test_client_mistakes_get_4xx_naming_the_field(
    app: dict[str, Any], kwargs: dict[str, Any], status: int, field: str
) -> None:
    headers = {"Authorization": f"Bearer {PREDICT}", **kwargs.pop("headers", {})}
    r = requests.post(
        f"{app['url']}/v1/models/digits/predict", headers=headers, timeout=60, **kwargs
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert set(r.json()["error"]) >= {"code", "message"}
    ok = _post(app, "digits", json={"images": _b64(png_bytes(0))})
    assert ok.status_code == 200  # still serving


def test_auth_models_and_routes(app: dict[str, Any]) -> None:
    body = {"json": {"images": _b64(png_bytes(0))}}
    assert _post(app, "digits", token=None, **body).status_code == 401
    assert _post(app, "digits", token="wrong", **body).status_code == 403
    assert _post(app, "digits", token=ADMIN, **body).status_code == 200
    r = _post(app, "nobody", **body)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = _post(app, "unpromoted", **body)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert _post(app, "Bad_Name", **body).json()["error"]["field"] == "model"
    r = requests.get(f"{app['url']}/no/such/route", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    auth = {"Authorization": f"Bearer {PREDICT}"}
    models = requests.get(f"{app['url']}/v1/models", headers=auth, timeout=10).json()
    assert {"name": "digits", "production": app["v1"]} in models["models"]
    versions = requests.get(
        f"{app['url']}/v1/models/digits/versions", headers=auth, timeout=10
    ).json()
    assert app["v1"] in versions["versions"]


def test_health_and_metrics(app: dict[str, Any]) -> None:
    assert requests.get(f"{app['url']}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{app['url']}/readyz", timeout=30).status_code == 200
    text = requests.get(f"{app['url']}/metrics", timeout=10).text
    assert 'refit_http_requests_total{route="/v1/models/{model}/predict",status="200"}' in text
    assert "refit_http_request_seconds_bucket" in text


def test_hot_swap_under_load(app: dict[str, Any]) -> None:
    reg: Registry = app["reg"]
    seen: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            r = _post(app, "digits", json={"images": _b64(png_bytes(1))})
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:100]}")
            else:
                seen.append((time.monotonic(), r.json()["model_version"]))
        session.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    v2 = publish(reg, "digits")
    promoted = time.monotonic()
    deadline = promoted + 30
    while time.monotonic() < deadline and not any(v == v2 for _, v in seen):
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    first_new = min(ts for ts, v in seen if v == v2)
    assert first_new - promoted < 5.0  # poll interval 0.5 s + load + warm-up
    after = [v for ts, v in sorted(seen) if ts > first_new + 0.5]
    assert after
    assert set(after) == {v2}
