"""Every route, in process: the FastAPI app over a real data plane (a real SeaweedFS, real tiny
models in an in-process ModelHost, a real job runner whose launcher only records), called
through ``httpx.ASGITransport``. No Ray, no Serve."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from api_app import ADMIN, METRICS, PREDICT, build_inprocess_app
from conftest import png_bytes, publish_tiny_model, write_imagefolder
from service.settings import RefitSettings
from training.storage.registry import Registry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def app_and_parts(module_settings: RefitSettings) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One app for the module: its tests read what ``digits`` publishes, and those that
    change state use names of their own."""
    app, parts = build_inprocess_app(module_settings)
    yield app, parts
    parts["close"]()


@pytest.fixture
def plane_parts(app_and_parts: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    return app_and_parts[1]


@pytest.fixture
async def client(app_and_parts: tuple[Any, dict[str, Any]]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_and_parts[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://refit") as c:
        yield c


def _auth(token: str | None = PREDICT) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def _tiny_state() -> dict[str, Any]:
    from training.backbones import build_backbone

    return build_backbone("resnet18", num_classes=3).state_dict()


def _b64(*images: bytes) -> list[str]:
    return [base64.b64encode(i).decode() for i in images]


@pytest.fixture(scope="module")
def digits(app_and_parts: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    """A served model (``digits``), a second version of it, and a model with no alias."""
    reg = app_and_parts[1]["registry"]
    first, _ = publish_tiny_model(reg, "digits")
    second, _ = publish_tiny_model(reg, "digits", promote=False)
    publish_tiny_model(reg, "unpromoted", promote=False)
    return {"first": first.version, "second": second.version}


async def test_predict_json_and_multipart(client: httpx.AsyncClient, digits: dict) -> None:
    r = await client.post(
        "/v1/models/digits/predict",
        json={"images": _b64(png_bytes(0), png_bytes(1)), "top_k": 2},
        headers=_auth(),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == digits["first"] == r.headers["x-model-version"]
    assert [len(p) for p in body["predictions"]] == [2, 2]
    assert {p["label"] for row in body["predictions"] for p in row} <= {"a", "b", "c"}
    files = [("a", ("a.png", png_bytes(0), "image/png")), ("b", ("b.png", png_bytes(2)))]
    r = await client.post(
        "/v1/models/digits/predict", files=files, data={"top_k": "1"}, headers=_auth()
    )
    assert r.status_code == 200, r.text
    assert [len(p) for p in r.json()["predictions"]] == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"json": {"images": ["***"]}}, 400, "images[0]"),
        ({"json": {"images": []}}, 400, "images"),
        ({"json": {"images": ["aGk="], "top_k": 99}}, 400, "top_k"),
        ({"json": {"images": _b64(_gif())}}, 415, "images[0]"),
        ({"json": {"images": _b64(b"\x89PNG\r\n\x1a\nbroken")}}, 422, "images[0]"),
        ({"content": b"x" * 400_000, "headers": {"Content-Type": "application/json"}}, 413, "body"),
        ({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400, "body"),
        ({"content": b"hi", "headers": {"Content-Type": "text/plain"}}, 400, "content-type"),
        ({"files": [("top_k", (None, "3"))]}, 400, "images"),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "body",
        ),
        (
            {"content": b"junk", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
            400,
            "body",
        ),
        ({"files": [("a", ("a.png", b"x"))], "data": {"top_k": "x"}}, 400, "top_k"),
    ],
)
async def test_predict_mistakes(
    client: httpx.AsyncClient, digits: dict, kwargs: dict, status: int, field: str
) -> None:
    headers = {**_auth(), **kwargs.pop("headers", {})}
    r = await client.post("/v1/models/digits/predict", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


async def test_predict_auth_unknown_and_unserved(client: httpx.AsyncClient, digits: dict) -> None:
    body = {"images": _b64(png_bytes(0))}
    url = "/v1/models/digits/predict"
    assert (await client.post(url, json=body)).status_code == 401
    r = await client.post(url, json=body, headers=_auth("wrong"))
    assert r.status_code == 401  # RFC 6750: not one of our tokens
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert (await client.post(url, json=body)).headers["www-authenticate"] == "Bearer"
    assert (await client.post(url, json=body, headers=_auth(ADMIN))).status_code == 200
    r = await client.post("/v1/models/nobody/predict", json=body, headers=_auth())
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = await client.post("/v1/models/unpromoted/predict", json=body, headers=_auth())
    assert (r.status_code, r.headers["retry-after"]) == (503, "1")
    for bad in ("Bad_Name", "a..b", "x" * 65):
        r = await client.post(f"/v1/models/{bad}/predict", json=body, headers=_auth())
        assert (r.status_code, r.json()["error"]["field"]) == (400, "model")


async def test_listing(
    client: httpx.AsyncClient,
    digits: dict,
    app_and_parts: tuple[Any, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = {"images": _b64(png_bytes(0))}
    assert (await client.post("/v1/models/digits/predict", json=body, headers=_auth())).is_success

    def no_heap_walk() -> list[object]:
        raise AssertionError("a listing walked the heap (that is /metrics' work)")

    monkeypatch.setattr("service.runtime.model_host.gc.get_objects", no_heap_walk)
    r = await client.get("/v1/models", headers=_auth())
    assert r.status_code == 200
    listed = {m["name"]: m for m in r.json()["models"]}
    assert listed["digits"]["production"] == digits["first"]
    # how this replica serves what it loaded: the version, the mode (fp32 configured here)
    assert listed["digits"]["serving"] == {
        "version": digits["first"],
        "mode": "fp32",
        "agreement": None,
        "fallback": None,
        "passed_over": {},
        "shared_stages": [],  # no other version of its trunk is loaded here
        "shared_bytes": 0,
        "model_bytes": sum(t.numel() * t.element_size() for t in _tiny_state().values()),
        "trunk": _trunk(app_and_parts[1]["registry"], digits["first"]),
    }
    assert listed["unpromoted"] == {"name": "unpromoted", "production": None, "serving": None}
    r = await client.get("/v1/models/digits/versions", headers=_auth())
    assert r.json()["versions"] == sorted([digits["first"], digits["second"]])
    assert r.json()["aliases"] == {"production": digits["first"]}
    assert (await client.get("/v1/models/nobody/versions", headers=_auth())).status_code == 404
    assert (await client.get("/v1/models")).status_code == 401


def _trunk(reg: Registry, version: str) -> str:
    """How a listing names the trunk of ``digits@version``: its backbone and content (the
    tiny models record no stage digests: the replica computes them at load)."""
    from training.stage_digests import prefix_digests, stage_digests

    manifest, state = reg.load_version("digits", version)
    digests = stage_digests(state, manifest.backbone, manifest.num_classes)
    return f"{manifest.backbone}/{prefix_digests(digests)[-2][:16]}"


async def test_promote_and_rollback(client: httpx.AsyncClient, plane_parts: dict) -> None:
    reg = plane_parts["registry"]
    digits = {
        "first": publish_tiny_model(reg, "moving")[0].version,
        "second": publish_tiny_model(reg, "moving", promote=False)[0].version,
    }
    admin = _auth(ADMIN)
    url = "/v1/models/moving"
    predict = {"json": {"images": _b64(png_bytes(0))}, "headers": _auth()}
    r = await client.post(f"{url}/predict", **predict)  # loads the first version
    assert r.json()["model_version"] == digits["first"]
    r = await client.post(f"{url}/promote", json={"version": digits["second"]}, headers=_auth())
    assert r.status_code == 403  # the predict token is not an admin token
    r = await client.post(f"{url}/promote", json={"version": digits["second"]}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "moving",
        "alias": "production",
        "version": digits["second"],
        "previous": digits["first"],
    }
    assert plane_parts["notified"] == ["moving"]
    r = await client.post(
        "/v1/models/moving/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
    )
    assert r.json()["model_version"] == digits["first"]  # the follower polls every 30 s here
    await plane_parts["plane"].predictor.host.refresh("moving")  # what a notice triggers
    r = await client.post(
        "/v1/models/moving/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
    )
    assert r.json()["model_version"] == digits["second"]
    r = await client.post(f"{url}/rollback", headers=admin)  # no body: production
    assert r.status_code == 200, r.text
    assert r.json()["version"] == digits["first"]
    for body, field in (
        ({"version": "production\n"}, "version"),
        ({"version": digits["first"], "alias": "../x"}, "alias"),
        ({"version": digits["first"], "extra": 1}, "extra"),
    ):
        r = await client.post(f"{url}/promote", json=body, headers=admin)
        assert (r.status_code, r.json()["error"]["field"]) == (400, field), r.text
    r = await client.post(
        f"{url}/promote", json={"version": "20000101-000000-000000"}, headers=admin
    )
    assert r.status_code == 404
    r = await client.post(f"{url}/rollback", json={"alias": "staging"}, headers=admin)
    assert r.status_code == 404


async def test_oip_infer_json_binary_and_tensor(client: httpx.AsyncClient, digits: dict) -> None:
    images = {
        "name": "images",
        "shape": [2],
        "datatype": "BYTES",
        "data": _b64(png_bytes(0), png_bytes(1)),
    }
    r = await client.post(
        "/v2/models/digits/infer",
        json={"id": "r1", "inputs": [images], "parameters": {"top_k": 2}},
        headers=_auth(),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["model_version"]) == ("r1", digits["first"])
    assert [o["shape"] for o in body["outputs"]] == [[2, 2], [2, 2]]
    # binary extension: header, then the BYTES elements as <u32 length><bytes>
    blob = b"".join(struct.pack("<I", len(p)) + p for p in (png_bytes(2),))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = await client.post(
        f"/v2/models/digits/versions/{digits['first']}/infer",
        content=header + blob,
        headers={
            **_auth(),
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    assert (
        json.loads(r.content[:length])["outputs"][1]["parameters"]["binary_data_size"] == 12
    )  # 3 classes, 3 float32
    tensor = {
        "name": "input",
        "shape": [1, 3, 32, 32],
        "datatype": "FP32",
        "data": [0.0] * 3 * 32 * 32,
    }
    r = await client.post("/v2/models/digits/infer", json={"inputs": [tensor]}, headers=_auth())
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v2/models/digits/versions/{digits['second']}/infer",
        json={"inputs": [images]},
        headers=_auth(),
    )
    assert (r.status_code, r.json()["error"]["field"]) == (404, "version")
    r = await client.post(
        "/v2/models/digits/infer",
        content=b"[" * 100_000,
        headers={**_auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400  # nesting past the JSON parser's depth limit: not a 500
    r = await client.post(  # a request id is echoed back: capped, not 1 MiB back to the client
        "/v2/models/digits/infer",
        json={"id": "i" * 257, "inputs": [images]},
        headers=_auth(),
    )
    assert (r.status_code, r.json()["error"]["field"]) == (400, "id"), r.text
    r = await client.post(
        "/v2/models/digits/infer",
        json={"inputs": [images]},
        headers={**_auth(), "Inference-Header-Content-Length": "x"},
    )
    assert (r.status_code, r.json()["error"]["field"]) == (400, "Inference-Header-Content-Length")


async def test_oip_metadata_readiness_health(client: httpx.AsyncClient, digits: dict) -> None:
    r = await client.get("/v2/models/digits", headers=_auth())
    assert r.status_code == 200
    assert r.json()["versions"] == [digits["first"]]
    assert r.json()["parameters"]["class_names"] == ["a", "b", "c"]
    assert r.json()["inputs"][1]["shape"] == [-1, 3, 32, 32]
    assert (await client.get("/v2/models/digits/ready", headers=_auth())).json()["ready"]
    r = await client.get("/v2/models/unpromoted/ready", headers=_auth())
    assert (r.status_code, r.json()["ready"]) == (503, False)
    assert (await client.get("/v2/models/nobody/ready", headers=_auth())).status_code == 404
    assert (await client.get("/v2/models/unpromoted", headers=_auth())).status_code == 503
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}


async def test_jobs_lifecycle(client: httpx.AsyncClient, plane_parts: dict) -> None:
    store, admin = plane_parts["store"], _auth(ADMIN)
    uri = write_imagefolder(store, "tiny", classes=2, train=2, val=1)
    spec = {
        "model": "tiny",
        "base": {"backbone": "resnet18"},
        "dataset": uri,
        "epochs": 1,
        "workers": 1,
    }
    r = await client.post(
        "/v1/finetune-jobs", json=spec, headers={**admin, "Idempotency-Key": "k1"}
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/finetune-jobs/{job['job_id']}"
    assert job["state"] == "queued"
    again = await client.post(
        "/v1/finetune-jobs", json=spec, headers={**admin, "Idempotency-Key": "k1"}
    )
    assert (again.status_code, again.json()["job_id"]) == (200, job["job_id"])
    assert again.headers["idempotent-replayed"] == "true"
    clash = await client.post(
        "/v1/finetune-jobs", json={**spec, "epochs": 2}, headers={**admin, "Idempotency-Key": "k1"}
    )
    assert clash.status_code == 409
    r = await client.get("/v1/finetune-jobs", headers=admin)
    assert [j["job_id"] for j in r.json()["jobs"]] == [job["job_id"]]
    r = await client.get(f"/v1/finetune-jobs/{job['job_id']}", headers=admin)
    assert r.status_code == 200
    assert r.json()["links"]["cancel"].endswith("/cancel")
    r = await client.get(f"/v1/finetune-jobs/{job['job_id']}/curve.png", headers=admin)
    assert (r.status_code, r.content[:4]) == (200, b"\x89PNG")
    r = await client.post(f"/v1/finetune-jobs/{job['job_id']}/cancel", headers=admin)
    assert r.status_code == 202, r.text
    assert r.json()["state"] in {"cancelled", "running"}
    if r.json()["state"] == "running":  # the runner had started it: its launcher stops it
        assert job["job_id"] in plane_parts["launcher"].stopped


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("POST", "/v1/finetune-jobs", {"content": b"{oops"}, 400, "body"),
        ("POST", "/v1/finetune-jobs", {"json": [1, 2]}, 400, "body"),
        ("POST", "/v1/finetune-jobs", {"json": {"model": "x"}}, 422, "base"),
        ("POST", "/v1/finetune-jobs", {"content": b"[" * 100_000}, 400, "body"),
        (
            "POST",
            "/v1/finetune-jobs",
            {"json": {}, "headers": {"Idempotency-Key": ""}},
            400,
            "Idempotency-Key",
        ),
        ("GET", "/v1/finetune-jobs/NOT..AN..ID", {}, 400, "job_id"),
        ("GET", "/v1/finetune-jobs/job-1", {}, 404, "job_id"),
        ("GET", "/v1/finetune-jobs?state=exploded", {}, 400, "state"),
        ("GET", "/v1/finetune-jobs?limit=0", {}, 400, "limit"),
        ("POST", "/v1/finetune-jobs/job-1/cancel", {}, 404, "job_id"),
    ],
)
async def test_job_mistakes(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict, status: int, field: Any
) -> None:
    headers = {**_auth(ADMIN), **kwargs.pop("headers", {})}
    r = await client.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"].get("field") == field


async def test_admin_needs_the_admin_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/finetune-jobs")).status_code == 401
    assert (await client.get("/v1/finetune-jobs", headers=_auth())).status_code == 403


async def test_ops(client: httpx.AsyncClient, digits: dict) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"ready": True}
    await client.post(
        "/v1/models/digits/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
    )
    anonymous = await client.get("/metrics")  # model names and job counts: not for anyone
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/metrics", headers=_auth(PREDICT))).status_code == 403
    text = (await client.get("/metrics", headers=_auth(METRICS))).text
    assert 'refit_http_requests_total{route="/v1/models/{model}/predict",status="200"}' in text
    assert "refit_model_loaded_info{" in text
    assert "refit_classifier_allocator_info{allocator=" in text
    assert 'refit_classifier_stage_reads_total{source="store"}' in text
    assert "refit_classifier_stage_cache_bytes " in text
    assert 'refit_classifier_model_cache_bytes{kind="budget"} 1.073741824e+09' in text
    assert "refit_classifier_model_parks_total 0.0" in text
    trunks = [ln for ln in text.splitlines() if ln.startswith("refit_classifier_resident_trunks ")]
    assert float(trunks[0].split()[1]) >= 1  # digits' (the other tests' models may be loaded)
    r = await client.get("/nowhere")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    "bad",
    [
        "production\n",
        "digits\x00",
        "a/b",
        "..",
        "a..b",
        "\uff44\uff49gits",  # fullwidth letters: NFKC folds them to "digits"
        "Digits",
        "-x",
        "x" * 65,
    ],
)
async def test_every_id_field_refuses_lookalikes(
    client: httpx.AsyncClient, digits: dict, bad: str
) -> None:
    admin = _auth(ADMIN)
    path = urllib.parse.quote(bad, safe="")
    r = await client.get(f"/v1/models/{path}/versions", headers=admin)
    assert r.status_code in {400, 404}, r.text  # never the model "digits"
    r = await client.post("/v1/models/digits/promote", json={"version": bad}, headers=admin)
    assert (r.status_code, r.json()["error"]["field"]) == (400, "version")
    r = await client.post(
        "/v1/models/digits/promote",
        json={"version": digits["first"], "alias": bad},
        headers=admin,
    )
    assert (r.status_code, r.json()["error"]["field"]) == (400, "alias")
    r = await client.post("/v1/models/digits/rollback", json={"alias": bad}, headers=admin)
    assert (r.status_code, r.json()["error"]["field"]) == (400, "alias")
    r = await client.get(f"/v1/finetune-jobs/{path}", headers=admin)
    assert r.status_code in {400, 404}
    versions = await client.get("/v1/models/digits/versions", headers=admin)
    assert versions.json()["aliases"] == {"production": digits["first"]}  # nothing moved


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"epochs": "3"}, "epochs"),  # strict: no coercion
        ({"base": {"backbone": "resnet18; rm -rf /"}}, "base.backbone"),
        ({"base": {"backbone": "resnet18", "weights": "file:///etc/passwd"}}, "base.weights"),
        ({"promote": "yes"}, "promote"),
    ],
)
async def test_spec_refused_at_create(
    client: httpx.AsyncClient, plane_parts: dict, over: dict, field: str
) -> None:
    uri = write_imagefolder(plane_parts["store"], "strict", classes=2, train=1, val=1)
    spec = {"model": "strict", "base": {"backbone": "resnet18"}, "dataset": uri, **over}
    r = await client.post("/v1/finetune-jobs", json=spec, headers=_auth(ADMIN))
    assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _png_with_text_bomb() -> bytes:
    """A valid PNG whose compressed text chunk inflates past Pillow's limit."""
    import zlib

    png = _png(8, 8)
    data = b"Comment\x00\x00" + zlib.compress(b"\x00" * (4 << 20), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + data) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # after the IHDR chunk


@pytest.mark.parametrize(
    ("image", "status"),
    [
        (lambda: _png(1, 200_000), 413),  # far under the pixel cap, a 200000:1 sliver
        (lambda: _png(1, 5_000_000), 413),
        (lambda: _png(10_000, 10), 413),
        (_png_with_text_bomb, 422),  # Pillow's ValueError is a corrupt image, not a 500
    ],
)
@pytest.mark.parametrize("body", ["json", "multipart", "oip-json", "oip-binary"])
async def test_decode_is_bounded(
    client: httpx.AsyncClient, digits: dict, image: Any, status: int, body: str
) -> None:
    """Every way an image arrives - base64 in JSON, a multipart file, the protocol's BYTES
    tensor in JSON or raw after its binary header - meets the same caps before its pixels
    are decoded, and the error names the image."""
    r = await _post_image(client, image(), body)
    assert (r.status_code, r.json()["error"]["field"]) == (status, "images[0]"), r.text


async def _post_image(client: httpx.AsyncClient, data: bytes, body: str) -> httpx.Response:
    """One image to the ``digits`` model through one of the request bodies."""
    if body == "json":
        return await client.post(
            "/v1/models/digits/predict", json={"images": _b64(data)}, headers=_auth()
        )
    if body == "multipart":
        return await client.post(
            "/v1/models/digits/predict", files={"file": ("a.png", data)}, headers=_auth()
        )
    tensor: dict[str, Any] = {"name": "images", "shape": [1], "datatype": "BYTES"}
    if body == "oip-json":
        tensor["data"] = _b64(data)
        return await client.post(
            "/v2/models/digits/infer", json={"inputs": [tensor]}, headers=_auth()
        )
    blob = struct.pack("<I", len(data)) + data
    tensor["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps({"inputs": [tensor]}).encode()
    return await client.post(
        "/v2/models/digits/infer",
        content=header + blob,
        headers={
            **_auth(),
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )


@pytest.mark.parametrize("body", ["json", "multipart", "oip-json", "oip-binary"])
async def test_image_byte_cap_holds_on_every_body(
    client: httpx.AsyncClient, digits: dict, plane_parts: dict, body: str
) -> None:
    """An image over ``max_image_bytes`` is refused by its length, never decoded (a valid
    PNG padded past the cap inside a body the route's byte limit still admits)."""
    cap = plane_parts["settings"].serve.max_image_bytes
    padded = _png(8, 8) + b"\x00" * cap
    r = await _post_image(client, padded, body)
    assert (r.status_code, r.json()["error"]["field"]) == (413, "images[0]"), r.text
    ok = await _post_image(client, png_bytes(1), body)
    assert ok.status_code == 200, ok.text


async def test_header_limits(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Big": "x" * 64 * 1024})
    assert (r.status_code, r.json()["error"]["code"]) == (431, "headers_too_large")
    many = {f"X-H{i}": "1" for i in range(1000)}
    assert (await client.get("/healthz", headers=many)).status_code == 431
    r = await client.get("/v1/models", headers={"Authorization": "Bearer " + "x" * (1 << 20)})
    assert r.status_code == 431
    assert (await client.get("/healthz")).status_code == 200


def _publish_weights(reg: Registry, name: str, state: dict[str, Any]) -> str:
    """A version whose files hash correctly, whatever its weights are."""
    from training.preprocessing_spec import Preprocessing

    pre = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    manifest = reg.publish(
        state,
        model=name,
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=pre,
    )
    return manifest.version


def _broken_states() -> dict[str, dict[str, Any]]:
    import torch

    from training.backbones import build_backbone

    good = build_backbone("resnet18", num_classes=3).state_dict()
    missing = {k: v for k, v in good.items() if k != "fc.bias"}
    extra = {**good, "surplus.weight": torch.zeros(2)}
    shape = {**good, "fc.weight": torch.zeros(4, 512)}
    wide = {**good, "fc.weight": good["fc.weight"].double()}
    return {"missing": missing, "extra": extra, "shape": shape, "float64": wide}


async def test_promote_refuses_versions_that_do_not_load(
    client: httpx.AsyncClient, plane_parts: dict
) -> None:
    reg, store, admin = plane_parts["registry"], plane_parts["store"], _auth(ADMIN)
    served, _ = publish_tiny_model(reg, "guarded")
    bad = {why: _publish_weights(reg, "guarded", s) for why, s in _broken_states().items()}
    # a version whose weights file is no safetensors file at all, yet hashes correctly
    notst = _publish_weights(reg, "guarded", _broken_states()["missing"])
    manifest, _ = reg.read_manifest("guarded", notst)
    blob = b"not safetensors"
    entry = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    forged = manifest.model_copy(
        update={"version": "20000101-000000-000000", "files": {"model.safetensors": entry}}
    )
    store.put_bytes("models/guarded/versions/20000101-000000-000000/model.safetensors", blob)
    store.put_bytes(
        "models/guarded/versions/20000101-000000-000000/manifest.json",
        reg.manifest_bytes(forged),
    )
    bad["not-safetensors"] = forged.version
    for why, version in bad.items():
        r = await client.post(
            "/v1/models/guarded/promote", json={"version": version}, headers=admin
        )
        assert r.status_code == 409, (why, r.text)
        assert r.json()["error"]["code"] == "integrity_error", why
        record, _ = reg.get_alias("guarded", "production")
        assert record.version == served.version, why  # the alias did not move


async def test_damaged_stored_objects_stay_with_their_model(
    client: httpx.AsyncClient, plane_parts: dict, digits: dict
) -> None:
    reg, store = plane_parts["registry"], plane_parts["store"]
    for name, content in (("broken", b"{"), ("huge", b" " * (10 << 20)), ("empty", b"")):
        publish_tiny_model(reg, name, promote=False)
        store.put_bytes(f"models/{name}/aliases/production.json", content)
    # an alias that points, with the right hash, at weights that verify but do not load
    version = _publish_weights(reg, "unloadable", _broken_states()["shape"])
    _, digest = reg.read_manifest("unloadable", version)
    record = {"version": version, "sha256": digest, "updated_at": "2026-01-01T00:00:00+00:00"}
    store.put_json("models/unloadable/aliases/production.json", record)

    listed = (await client.get("/v1/models", headers=_auth())).json()["models"]
    by_name = {m["name"]: m for m in listed}
    assert by_name["digits"]["production"] == digits["first"]
    for name in ("broken", "huge", "empty"):
        assert by_name[name]["error"]["code"] == "integrity_error", by_name[name]
        r = await client.get(f"/v1/models/{name}/versions", headers=_auth())
        assert (r.status_code, r.json()["error"]["field"]) == (409, "model"), r.text
        r = await client.post(
            f"/v1/models/{name}/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
        )
        assert r.status_code == 409, r.text
    r = await client.post(
        "/v1/models/unloadable/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
    )
    assert (r.status_code, r.json()["error"]["code"]) == (409, "integrity_error"), r.text
    r = await client.post(
        "/v1/models/digits/predict", json={"images": _b64(png_bytes(0))}, headers=_auth()
    )
    assert r.status_code == 200  # everyone else keeps being served
