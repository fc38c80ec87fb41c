"""The Serve app end to end over HTTP (real Ray Serve proxy, real SeaweedFS)."""

from __future__ import annotations

import base64
import io
import json
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from conftest import free_port, png_bytes, publish_tiny_model
from service.embedded_store import Connection
from service.settings import RefitSettings, ServeSettings
from training.preprocessing_spec import Preprocessing
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.usefixtures("ray_session")]
PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
PREDICT, ADMIN, METRICS = "predict-token-x", "admin-token-y", "metrics-token-z"
SCRAPE = {"Authorization": f"Bearer {METRICS}"}


def publish(reg: Registry, name: str, *, promote: bool = True) -> str:
    return publish_tiny_model(reg, name, promote=promote)[0].version


@pytest.fixture(scope="module")
def app(seaweed: Connection) -> Iterator[dict[str, Any]]:
    from service import deployments

    settings = RefitSettings(
        s3=seaweed.s3_settings(prefix=f"serve-{uuid.uuid4().hex[:8]}"),
        serve=ServeSettings(
            port=free_port(),
            predict_token=PREDICT,
            admin_token=ADMIN,
            metrics_token=METRICS,
            max_body_bytes=400_000,
            poll_interval_s=0.5,
            numeric_mode="fp32",
            classifier_cpus=1,
            classifier_replicas=1,  # /metrics scrapes see the one replica
            # Serve's batcher in front of the lane (a wait window): the other Serve test
            # modules run the default, requests straight to the lane
            batch_wait_timeout_s=0.002,
        ),
    )
    reg = Registry(ObjectStore(settings.s3))
    v1 = publish(reg, "digits")
    publish(reg, "unpromoted", promote=False)
    env = deployments.run(settings)
    url = f"http://127.0.0.1:{settings.serve.port}"
    try:
        yield {"url": url, "reg": reg, "v1": v1, "env": env}
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
        (
            {"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "body",
        ),
        (
            {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
            400,
            "body",
        ),
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
    assert _post(app, "digits", token="wrong", **body).status_code == 401
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
    digits = next(m for m in models["models"] if m["name"] == "digits")
    assert digits["production"] == app["v1"]
    # this replica served it just now: its version and numeric mode
    assert (digits["serving"]["version"], digits["serving"]["mode"]) == (app["v1"], "fp32")
    versions = requests.get(
        f"{app['url']}/v1/models/digits/versions", headers=auth, timeout=10
    ).json()
    assert app["v1"] in versions["versions"]


def test_health_and_metrics(app: dict[str, Any]) -> None:
    assert _post(app, "digits", json={"images": _b64(png_bytes(0))}).status_code == 200
    assert requests.get(f"{app['url']}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{app['url']}/readyz", timeout=30).status_code == 200
    text = requests.get(f"{app['url']}/metrics", headers=SCRAPE, timeout=10).text
    assert 'refit_http_requests_total{route="/v1/models/{model}/predict",status="200"}' in text
    assert "refit_http_request_seconds_bucket" in text


def test_a_prediction_crosses_one_replica(app: dict[str, Any]) -> None:
    """Serve's proxy hands predictions straight to the replica that runs the model: the
    application is one deployment, and the process that counted the HTTP request is the one
    holding the model (its /metrics shows both)."""
    from ray import serve

    status = serve.status().applications["refit"]
    assert list(status.deployments) == ["Classifier"]
    assert _post(app, "digits", json={"images": _b64(png_bytes(0))}).status_code == 200
    text = requests.get(f"{app['url']}/metrics", headers=SCRAPE, timeout=10).text
    route = 'refit_http_requests_total{route="/v1/models/{model}/predict",status="200"}'
    assert _metric(text, route) >= 1
    assert 'refit_model_loaded_info{mode="fp32",model="digits"' in text


def _haproxy_servers(env: dict[str, str]) -> dict[str, int]:
    """Requests each HAProxy server (a replica, or Serve's fallback proxy) has been sent, from
    HAProxy's own stats page (this Serve's port)."""
    port = env["RAY_SERVE_HAPROXY_STATS_PORT"]
    csv = requests.get(f"http://127.0.0.1:{port}/stats;csv", timeout=10).text
    header, *rows = (line.split(",") for line in csv.splitlines() if line)
    col = {name.lstrip("# "): i for i, name in enumerate(header)}
    return {
        r[col["svname"]]: int(r[col["stot"]] or 0)
        for r in rows
        if r[col["svname"]] not in ("FRONTEND", "BACKEND")
    }


def test_the_default_ingress_is_haproxy_straight_to_the_replica(app: dict[str, Any]) -> None:
    """With the default ingress, HAProxy hands every prediction to the replica's own HTTP
    server: Serve's Python proxy (HAProxy's fallback) is sent none of them."""
    before = _haproxy_servers(app["env"])
    for _ in range(5):
        assert _post(app, "digits", json={"images": _b64(png_bytes(0))}).status_code == 200
    after = _haproxy_servers(app["env"])
    sent = {name: n - before.get(name, 0) for name, n in after.items()}
    replicas = {k: v for k, v in sent.items() if k.startswith("SERVE_REPLICA")}
    fallback = {k: v for k, v in sent.items() if "PROXY" in k}
    assert sum(replicas.values()) == 5, sent
    assert fallback, sent  # the fallback proxy is there, and was sent nothing
    assert sum(fallback.values()) == 0, sent


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


def _v2(app: dict[str, Any], path: str, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {PREDICT}", **kw.pop("headers", {})}
    return requests.post(f"{app['url']}/v2/models/digits/{path}", headers=headers, timeout=60, **kw)


def test_oip_json_bytes_and_fp32(app: dict[str, Any]) -> None:
    body = {
        "id": "r1",
        "inputs": [
            {
                "name": "images",
                "shape": [2],
                "datatype": "BYTES",
                "data": _b64(png_bytes(0), png_bytes(2)),
            }
        ],
        "parameters": {"top_k": 2},
    }
    r = _v2(app, "infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1"
    assert out["labels"]["shape"] == [2, 2]
    assert len(out["scores"]["data"]) == 4
    version = r.json()["model_version"]
    torch_input = [0.0] * (3 * 32 * 32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": torch_input}
        ]
    }
    r = _v2(app, f"versions/{version}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == 1


def test_oip_tritonclient_binary(app: dict[str, Any]) -> None:
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=app["url"].removeprefix("http://"))
    images = httpclient.InferInput("images", [3], "BYTES")
    images.set_data_from_numpy(
        np.array([png_bytes(0), png_bytes(1), png_bytes(2)], dtype=object), binary_data=True
    )
    outputs = [
        httpclient.InferRequestedOutput("labels", binary_data=True),
        httpclient.InferRequestedOutput("scores", binary_data=True),
    ]
    res = client.infer(
        "digits", [images], outputs=outputs, headers={"Authorization": f"Bearer {PREDICT}"}
    )
    labels, scores = res.as_numpy("labels"), res.as_numpy("scores")
    assert labels.shape[0] == 3
    assert {x.decode() for x in labels[:, 0]} <= {"a", "b", "c"}
    assert np.all(scores[:, 0] >= scores[:, -1])
    tensor = httpclient.InferInput("input", [2, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 3, 32, 32), dtype=np.float32), binary_data=True)
    res = client.infer("digits", [tensor], headers={"Authorization": f"Bearer {PREDICT}"})
    assert res.as_numpy("labels").shape[0] == 2
    client.close()


@pytest.mark.parametrize(
    ("tensor", "status", "field"),
    [
        (
            {"name": "images", "shape": [1], "datatype": "INT64", "data": [1]},
            400,
            "inputs[0].datatype",
        ),
        (
            {"name": "images", "shape": [2], "datatype": "BYTES", "data": _b64(png_bytes(0))},
            400,
            "inputs[0].data",
        ),
        (
            {"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768},
            400,
            "inputs[0].shape",
        ),
        (
            {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 7},
            400,
            "inputs[0].data",
        ),
        (
            {"name": "images", "shape": [1000], "datatype": "BYTES", "data": []},
            413,
            "inputs[0].shape",
        ),
        (
            {"name": "images", "shape": [1], "datatype": "BYTES", "data": _b64(b"junk")},
            422,
            "images[0]",
        ),
        (
            {"name": "foo", "shape": [1], "datatype": "BYTES", "data": _b64(png_bytes(0))},
            400,
            "inputs[0].name",
        ),
    ],
)
def test_oip_errors(app: dict[str, Any], tensor: dict[str, Any], status: int, field: str) -> None:
    r = _v2(app, "infer", json={"inputs": [tensor]})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_oip_binary_header_and_metadata(app: dict[str, Any]) -> None:
    r = _v2(
        app,
        "infer",
        data=b'{"inputs": []}',
        headers={
            "Inference-Header-Content-Length": "9999",
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "Inference-Header-Content-Length"
    r = _v2(
        app,
        "versions/19990101-000000-abcdef/infer",
        json={
            "inputs": [
                {"name": "images", "shape": [1], "datatype": "BYTES", "data": _b64(png_bytes(0))}
            ]
        },
    )
    assert r.status_code == 404
    assert r.json()["error"]["field"] == "version"
    auth = {"Authorization": f"Bearer {PREDICT}"}
    meta = requests.get(f"{app['url']}/v2/models/digits", headers=auth, timeout=10).json()
    assert meta["inputs"][1]["shape"] == [-1, 3, 32, 32]
    assert meta["parameters"]["class_names"] == ["a", "b", "c"]
    assert (
        requests.get(f"{app['url']}/v2/models/digits/ready", headers=auth, timeout=10).status_code
        == 200
    )
    assert (
        requests.get(
            f"{app['url']}/v2/models/unpromoted/ready", headers=auth, timeout=10
        ).status_code
        == 503
    )
    assert (
        requests.get(f"{app['url']}/v2/models/nobody/ready", headers=auth, timeout=10).status_code
        == 404
    )
    assert requests.get(f"{app['url']}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{app['url']}/v2/health/ready", timeout=10).status_code == 200


def test_promote_and_rollback_are_admin_and_followed(app: dict[str, Any]) -> None:
    reg: Registry = app["reg"]
    url = f"{app['url']}/v1/models/digits"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    current = reg.get_alias("digits", "production")[0].version
    new = publish(reg, "digits", promote=False)
    assert requests.post(f"{url}/promote", json={"version": new}, timeout=30).status_code == 401
    r = requests.post(
        f"{url}/promote",
        json={"version": new},
        timeout=30,
        headers={"Authorization": f"Bearer {PREDICT}"},
    )
    assert r.status_code == 403
    r = requests.post(
        f"{url}/promote", json={"version": "19990101-000000-abcdef"}, headers=admin, timeout=30
    )
    assert r.status_code == 404
    r = requests.post(f"{url}/promote", json={"version": "../x"}, headers=admin, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "version"
    r = requests.post(f"{url}/promote", json={"version": new}, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "digits",
        "alias": "production",
        "version": new,
        "previous": current,
    }

    def served() -> str:
        return _post(app, "digits", json={"images": _b64(png_bytes(0))}).json()["model_version"]

    deadline = time.monotonic() + 20
    while served() != new and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served() == new
    r = requests.post(f"{url}/rollback", json={}, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == current
    deadline = time.monotonic() + 20
    while served() != current and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served() == current


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_replica_metrics_and_memory_over_20_swaps(app: dict[str, Any]) -> None:
    reg: Registry = app["reg"]
    metrics_url = f"{app['url']}/metrics"

    def served() -> str:
        return _post(app, "digits", json={"images": _b64(png_bytes(0))}).json()["model_version"]

    served()
    text = requests.get(metrics_url, headers=SCRAPE, timeout=30).text
    current = reg.get_alias("digits", "production")[0].version
    assert f'refit_model_loaded_info{{mode="fp32",model="digits",version="{current}"}} 1.0' in text
    baseline = _metric(text, "refit_classifier_rss_bytes")
    swaps_before = _metric(text, 'refit_model_swaps{model="digits"}')
    for _ in range(20):
        version = publish(reg, "digits")
        deadline = time.monotonic() + 20
        while served() != version and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served() == version
    text = requests.get(metrics_url, headers=SCRAPE, timeout=30).text
    assert _metric(text, 'refit_model_swaps{model="digits"}') >= swaps_before + 20
    assert _metric(text, 'refit_model_failed_loads{model="digits"}') == 0
    after = _metric(text, "refit_classifier_rss_bytes")
    # one model object per loaded name: every replaced version was freed (no leak)
    assert _metric(text, "refit_classifier_models_alive") <= 2
    assert after <= 1.10 * baseline, (baseline, after)


def _haproxy_dir(env: dict[str, str]) -> Path:
    """The per-node directory of this Serve's HAProxy (its config names the stats port)."""
    port = env["RAY_SERVE_HAPROXY_STATS_PORT"]
    for cfg in Path("/tmp/haproxy-serve").glob("*/haproxy.cfg"):  # Ray's fixed location
        if f":{port}\n" in cfg.read_text():
            return cfg.parent
    raise AssertionError(f"no HAProxy config with stats port {port}")


def test_haproxy_side_doors_are_closed(app: dict[str, Any]) -> None:
    """The config HAProxy runs binds the stats page and the exporter to 127.0.0.1 only, and
    its admin socket is mode 600 in a directory only this user can enter."""
    env = app["env"]
    directory = _haproxy_dir(env)
    text = (directory / "haproxy.cfg").read_text()
    assert text.startswith("# narrowed by refit-haproxy")
    stats, metrics = env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert f"bind 127.0.0.1:{stats}\n" in text
    assert f"bind 127.0.0.1:{metrics}\n" in text
    assert stat.S_IMODE((directory / "admin.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    # the stats page answers on 127.0.0.1 and nowhere else (127.0.0.2 is this host too)
    assert requests.get(f"http://127.0.0.1:{stats}/stats", timeout=10).status_code == 200
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", int(stats)), timeout=5):
        pass


def _raw_request(app: dict[str, Any], head: str) -> tuple[bytes, bool]:
    """Send a raw request head; the response bytes, and whether the server closed the
    connection within 5 s of answering."""
    port = int(app["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode())
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            return data, False
        return data, True


@pytest.mark.parametrize(
    ("extra", "status", "field"),
    [
        ("".join(f"X-H{i}: v\r\n" for i in range(80)), 431, "headers"),  # the app's cap (64)
        ("Content-Type: application/json\r\nContent-Length: 900000000\r\n", 413, "body"),
        ("Content-Type: application/json\r\nContent-Length: 400001\r\n", 413, "body"),
        # HAProxy's own parser (over 101 fields): its plain 400, before any rule applies
        ("".join(f"X-H{i}: v\r\n" for i in range(120)), 400, None),
    ],
)
def test_a_refusal_before_the_request_was_read_closes_the_connection(
    app: dict[str, Any], extra: str, status: int, field: str | None
) -> None:
    """A 413/431 (the body or headers were not read) answers JSON naming the field and closes
    the client's connection at once; HAProxy would otherwise keep it open, waiting for a body
    nobody reads. A body over its route's limit (here 400,000 bytes) is refused by HAProxy
    from the declared length, before a replica sees it."""
    head = f"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\n{extra}\r\n"
    data, closed = _raw_request(app, head)
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    if field is not None:
        assert _json_body(data)["error"]["field"] == field
    assert closed, data[:300]


def _json_body(response: bytes) -> Any:
    """The JSON body of a raw HTTP/1.1 response (chunked or not)."""
    head, body = response.split(b"\r\n\r\n", 1)
    if b"transfer-encoding: chunked" in head.lower():
        out = b""
        while True:
            size_line, body = body.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                break
            out, body = out + body[:size], body[size + 2 :]
        body = out
    return json.loads(body)
