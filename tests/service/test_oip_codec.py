"""OIP v2 request parsing without a server: every malformed request is a 4xx naming a field."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from conftest import png_bytes
from service.dataplane.oip_codec import InferRequest, build_response, parse_infer
from service.request_errors import BadRequestError, TooLargeError


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
        ({"name": "x", "shape": [1, 2**70], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        ({"name": "x", "shape": [1, 2**62, 4], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        ({"name": "x", "shape": [], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        ({"name": "x", "shape": [-1], "datatype": "BYTES", "data": []}, "inputs[0].shape"),
        (
            {"name": "x", "shape": [1, 3, 2048, 2], "datatype": "FP32", "data": [0.0]},
            "inputs[0].shape",
        ),
        (
            {"name": "x", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": ["a", "b", "c"]},
            "inputs[0].data",
        ),
        (
            {"name": "x", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [1.0, 2.0, 1e999]},
            "inputs[0].data",
        ),
        ({"name": "x", "shape": [1], "datatype": "BYTES", "data": [5]}, "inputs[0].data"),
        ({"name": "x", "shape": [1], "datatype": "BYTES"}, "inputs[0].data"),
    ],
)
def test_bad_tensors(tensor: dict, field: str) -> None:
    with pytest.raises(BadRequestError) as err:
        parse_infer(_json(tensor), None, max_images=8)
    assert err.value.field == field


def test_bad_envelopes() -> None:
    t = {
        "name": "x",
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
