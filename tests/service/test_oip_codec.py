"""OIP v2 request parsing without a server: every malformed request is a 4xx naming a field."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from conftest import png_bytes
from service.api.oip_codec import InferRequest, build_response, parse_infer
from service.request_errors import BadRequestError, TooLargeError
from training.storage.errors import RefitError


def _json(tensor: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


def test_binary_bytes_and_fp32_round_trip() -> None:
    imgs = [png_bytes(0), png_bytes(1)]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in imgs)
    head = _json(
        {
            "name": "images",
            "shape": [2],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(blob)},
        }
    )
    req = parse_infer(head + blob, len(head), max_images=8)
    assert req.images == imgs
    x = np.arange(2 * 3 * 4 * 4, dtype="<f4")
    head = _json(
        {
            "name": "input",
            "shape": [2, 3, 4, 4],
            "datatype": "FP32",
            "parameters": {"binary_data_size": x.nbytes},
        }
    )
    req = parse_infer(head + x.tobytes(), len(head), max_images=8)
    assert req.tensor is not None
    assert req.tensor.shape == (2, 3, 4, 4)
    assert float(req.tensor[1, 2, 3, 3]) == float(x[-1])


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (
            {"name": "images", "shape": [1, 2**70], "datatype": "BYTES", "data": []},
            "inputs[0].shape",
        ),
        (
            {"name": "images", "shape": [1, 2**62, 4], "datatype": "BYTES", "data": []},
            "inputs[0].shape",
        ),
        ({"name": "images", "shape": [], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        ({"name": "images", "shape": [-1], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        (
            {"name": "input", "shape": [1, 3, 2048, 2], "datatype": "FP32", "data": [0.0]},
            "inputs[0].shape",
        ),
        (
            {"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": ["a", "b", "c"]},
            "inputs[0].data",
        ),
        (
            {"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [1.0, 2.0, 1e999]},
            "inputs[0].data",
        ),
        ({"name": "images", "shape": [1], "datatype": "BYTES", "data": [5]}, "inputs[0].data"),
        ({"name": "images", "shape": [1], "datatype": "BYTES"}, "inputs[0].data"),
    ],
)
def test_bad_tensors(tensor: dict, field: str) -> None:
    with pytest.raises(BadRequestError) as err:
        parse_infer(_json(tensor), None, max_images=8)
    assert err.value.field == field


def test_bad_envelopes() -> None:
    t = {
        "name": "images",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(png_bytes(0)).decode()],
    }
    for body, length, field in [
        (b"\xff\xfe not json", None, "body"),
        (b"[1, 2]", None, "body"),
        (json.dumps({"inputs": [t, t]}).encode(), None, "inputs"),
        (_json(t), 10_000, "Inference-Header-Content-Length"),
        (
            _json({**t, "parameters": {"binary_data_size": 7}}),
            None,
            "inputs[0].parameters.binary_data_size",
        ),
        (_json(t, outputs=[{"name": "logits"}]), None, "outputs[0].name"),
        (_json(t, parameters={"top_k": 0}), None, "parameters.top_k"),
    ]:
        with pytest.raises(BadRequestError) as err:
            parse_infer(body, length, max_images=8)
        assert err.value.field == field, body
    with pytest.raises(TooLargeError):
        parse_infer(_json({**t, "shape": [9], "data": t["data"] * 9}), None, max_images=8)


def test_binary_response_layout() -> None:
    result = {
        "model": "m",
        "model_version": "v1",
        "prediction_id": "20261203-061500123-0123456789ab",
        "predictions": [[{"label": "a", "score": 0.75}, {"label": "bb", "score": 0.25}]],
    }
    req = InferRequest(id="7", images=None, tensor=None, top_k=2, binary_outputs={"scores"})
    body, headers, media = build_response(result, req)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert media == "application/octet-stream"
    assert head["id"] == "7"
    assert head["parameters"]["prediction_id"] == result["prediction_id"]
    assert headers["X-Prediction-Id"] == result["prediction_id"]
    assert head["outputs"][0]["data"] == ["a", "bb"]
    assert np.frombuffer(body[n:], dtype="<f4").tolist() == [0.75, 0.25]


_IMAGE = base64.b64encode(png_bytes(0)).decode()
_BYTES = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [_IMAGE]}
_FP32 = {"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        # the protocol's JSON, strictly (KServe's and Triton's answers): request -> status, field
        ({"inputs": [_BYTES]}, "text/plain", 415, "Content-Type"),
        ({"inputs": [_BYTES]}, "application/x-www-form-urlencoded", 415, "Content-Type"),
        ({"inputs": [_BYTES], "parameters": {"top_k": {"k": 3}}}, None, 400, "parameters.top_k"),
        ({"inputs": [{**_BYTES, "parameters": {"x": [1]}}]}, None, 400, "inputs[0].parameters.x"),
        (
            {"inputs": [_BYTES], "outputs": [{"name": "labels", "parameters": {"a": None}}]},
            None,
            400,
            "outputs[0].parameters.a",
        ),
        ({"inputs": [{**_FP32, "data": [True, 0.5, 0.1]}]}, None, 400, "inputs[0].data"),
        ({"inputs": [{**_FP32, "data": ["0.5", "0.5", "0.5"]}]}, None, 400, "inputs[0].data"),
        ({"inputs": [{**_BYTES, "name": "foo"}]}, None, 400, "inputs[0].name"),
        ({"inputs": [{**_FP32, "name": "images"}]}, None, 400, "inputs[0].datatype"),
        ({"inputs": [{**_BYTES, "name": "input"}]}, None, 400, "inputs[0].datatype"),
        ({"inputs": []}, None, 400, "inputs"),
        ({"id": "x"}, None, 400, "inputs"),
        # what stays accepted: JSON with or without a charset, and no type (tritonclient)
        ({"inputs": [_BYTES], "parameters": {"top_k": 3}}, "application/json", 200, None),
        ({"inputs": [_FP32]}, "application/json; charset=utf-8", 200, None),
        ({"inputs": [_FP32], "parameters": {"note": "x", "flag": True}}, None, 200, None),
    ],
)
def test_the_protocol_is_strict(
    body: dict, content_type: str | None, status: int, field: str | None
) -> None:
    raw = json.dumps(body).encode()
    if status == 200:
        req = parse_infer(raw, None, max_images=8, content_type=content_type)
        assert (req.images is not None) != (req.tensor is not None)
        return
    with pytest.raises(RefitError) as err:
        parse_infer(raw, None, max_images=8, content_type=content_type)
    assert (err.value.status, err.value.field) == (status, field)


def test_the_binary_extension_takes_octet_stream() -> None:
    x = np.zeros(3, dtype="<f4")
    head = _json({**_FP32, "data": None, "parameters": {"binary_data_size": x.nbytes}})
    for content_type in ("application/octet-stream", "application/json", None):
        req = parse_infer(head + x.tobytes(), len(head), max_images=8, content_type=content_type)
        assert req.tensor is not None
    with pytest.raises(RefitError) as err:
        parse_infer(head + x.tobytes(), len(head), max_images=8, content_type="text/plain")
    assert (err.value.status, err.value.field) == (415, "Content-Type")
