"""Open Inference Protocol v2 (KServe, Triton, MLServer): request parsing, response building.

Supports JSON tensors and the binary tensor data extension (``Inference-Header-Content-Length``;
BYTES elements as 4-byte little-endian length + bytes, FP32 as raw little-endian floats), which
tritonclient uses. Inputs: one BYTES tensor ``[N]`` of encoded images (base64 in JSON), or one
FP32 tensor ``[N, 3, H, W]`` already preprocessed. Outputs: ``labels`` (BYTES ``[N, k]``) and
``scores`` (FP32 ``[N, k]``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from service.request_errors import (
    BadRequestError,
    TooLargeError,
    UnsupportedMediaTypeError,
    bad_request,
)

INPUTS = {"images": "BYTES", "input": "FP32"}
"""The model's declared inputs (``GET /v2/models/{model}``) and their datatypes."""


def _parameter(value: Any) -> Any:
    # the protocol's parameter values are string, number or bool: nothing nested, no null
    if not isinstance(value, str | int | float | bool):
        raise ValueError("a parameter is a string, a number or a bool")
    return value


Parameters = dict[str, Annotated[str | int | float | bool, BeforeValidator(_parameter)]]


class RequestInput(BaseModel):
    """One input tensor: ``images`` (BYTES ``[N]``, base64 in JSON) or ``input`` (FP32
    ``[N, 3, H, W]``, preprocessed). With the binary extension, ``data`` is absent and
    ``parameters.binary_data_size`` gives its length after the JSON header."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="``images`` (BYTES) or ``input`` (FP32)")
    shape: list[int] = Field(min_length=1, max_length=4)
    datatype: Literal["BYTES", "FP32"]
    data: list[Any] | None = None
    parameters: Parameters = Field(default_factory=dict)


class RequestOutput(BaseModel):
    """A requested output (``labels`` or ``scores``); ``parameters.binary_data`` asks for it
    in binary, ``parameters.classification`` sets k."""

    model_config = ConfigDict(extra="allow")

    name: Literal["labels", "scores"]
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """An Open Inference Protocol v2 inference request (one input)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = Field(default=None, max_length=256)
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None
    parameters: Parameters = Field(
        default_factory=dict, description="``top_k``: labels per image (default 5)"
    )


class ResponseOutput(BaseModel):
    """One output tensor: ``labels`` (BYTES ``[N, k]``) or ``scores`` (FP32 ``[N, k]``);
    binary outputs carry ``parameters.binary_data_size`` instead of ``data``."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferenceResponse(BaseModel):
    """An Open Inference Protocol v2 inference response."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="``prediction_id``: what a label sent back to the feedback route names",
    )
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    """A tensor's name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class MetadataModelResponse(BaseModel):
    """Open Inference Protocol v2 model metadata."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(default_factory=dict)


@dataclass
class InferRequest:
    """A parsed inference request."""

    id: str | None
    images: list[bytes] | None
    tensor: torch.Tensor | None
    top_k: int | None
    binary_outputs: set[str]


def _flatten(data: Any, limit: int) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise TooLargeError(f"more than {limit} elements", field="inputs[0].data")
    return out


def _bytes_elements(raw: bytes, n: int) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequestError("truncated BYTES element length", field="inputs[0].data")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise BadRequestError("truncated BYTES element", field="inputs[0].data")
        items.append(raw[pos : pos + size])
        pos += size
    if len(items) != n:
        raise BadRequestError(f"{len(items)} elements for shape [{n}]", field="inputs[0].data")
    return items


def _check_content_type(content_type: str | None, binary: bool) -> None:
    """JSON, or with the binary extension octet-stream; no type at all is taken as the
    protocol's (tritonclient sends none)."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    json_type = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
    if not (json_type or (binary and media == "application/octet-stream")):
        wanted = "application/json" + (" or application/octet-stream" if binary else "")
        raise UnsupportedMediaTypeError(
            f"{media or 'an empty type'}: an infer request is {wanted}", field="Content-Type"
        )


def _numbers(flat: list[Any]) -> None:
    # FP32 takes numbers only: a bool or a numeric string is a client bug, not a value
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat):
        raise BadRequestError("FP32 data must be numbers", field="inputs[0].data")


def parse_infer(
    body: bytes,
    header_length: int | None,
    *,
    max_images: int,
    max_side: int = 1024,
    content_type: str | None = None,
) -> InferRequest:
    """Validate an infer request as strictly as KServe's and Triton's servers do; every
    error names the field (``Content-Type`` 415; the rest 400 or 413)."""
    _check_content_type(content_type, header_length is not None)
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequestError("outside the body", field="Inference-Header-Content-Length")
    header, binary = (body[:header_length], body[header_length:]) if header_length else (body, b"")
    try:
        req = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise bad_request(exc) from None
    t = req.inputs[0]
    if t.name not in INPUTS:
        raise BadRequestError(
            f"{t.name!r} is not an input of the model (images: BYTES, input: FP32)",
            field="inputs[0].name",
        )
    if t.datatype != INPUTS[t.name]:
        raise BadRequestError(
            f"input {t.name!r} is {INPUTS[t.name]}, not {t.datatype}", field="inputs[0].datatype"
        )
    if any(not 0 <= d <= 1 << 31 for d in t.shape):
        raise BadRequestError("1 to 4 dimensions, each 0..2^31", field="inputs[0].shape")
    n = t.shape[0]
    if not 1 <= n <= max_images:
        raise TooLargeError(f"batch must be 1..{max_images}", field="inputs[0].shape")
    size = t.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise BadRequestError(
                "binary_data_size does not match the binary data",
                field="inputs[0].parameters.binary_data_size",
            )
    elif t.data is None:
        raise BadRequestError("needs data or binary_data_size", field="inputs[0].data")
    images: list[bytes] | None = None
    tensor: torch.Tensor | None = None
    if t.datatype == "BYTES":
        if math.prod(t.shape) != n:
            raise BadRequestError("BYTES input must have shape [N]", field="inputs[0].shape")
        if size is not None:
            images = _bytes_elements(binary, n)
        else:
            flat = _flatten(t.data, n)
            if len(flat) != n or not all(isinstance(x, str) for x in flat):
                raise BadRequestError(f"needs {n} base64 strings", field="inputs[0].data")
            try:
                images = [base64.b64decode(x, validate=True) for x in flat]
            except (binascii.Error, ValueError):
                raise BadRequestError("not valid base64", field="inputs[0].data") from None
    else:  # FP32
        if len(t.shape) != 4 or t.shape[1] != 3 or max(t.shape[2:]) > max_side:
            raise BadRequestError(
                f"FP32 input must be [N, 3, H, W] with H, W <= {max_side}",
                field="inputs[0].shape",
            )
        count = math.prod(t.shape)
        if size is not None:
            if size != 4 * count:
                raise BadRequestError(
                    f"{size} bytes for {count} FP32 values", field="inputs[0].data"
                )
            array = np.frombuffer(binary, dtype="<f4").copy()
        else:
            flat = _flatten(t.data, count)
            if len(flat) != count:
                raise BadRequestError(
                    f"{len(flat)} values for shape {t.shape}", field="inputs[0].data"
                )
            _numbers(flat)
            try:
                array = np.asarray(flat, dtype=np.float32)
            except (TypeError, ValueError):
                raise BadRequestError("values must be numbers", field="inputs[0].data") from None
        if not np.isfinite(array).all():
            raise BadRequestError("values must be finite", field="inputs[0].data")
        tensor = torch.from_numpy(array.reshape(t.shape))
    top_k = req.parameters.get("top_k")
    binary_outputs: set[str] = set()
    for out in req.outputs or []:
        if out.parameters.get("binary_data"):
            binary_outputs.add(out.name)
        top_k = out.parameters.get("classification", top_k)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise BadRequestError("must be a positive integer", field="parameters.top_k")
    return InferRequest(req.id, images, tensor, top_k, binary_outputs)


def build_response(result: dict[str, Any], req: InferRequest) -> tuple[bytes, dict[str, str], str]:
    """The response body, extra headers and content type for a classifier result."""
    preds = result["predictions"]
    n, k = len(preds), len(preds[0]) if preds else 0
    labels = [p["label"] for row in preds for p in row]
    scores = [float(p["score"]) for row in preds for p in row]
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    columns: list[tuple[str, str, list[Any]]] = [
        ("labels", "BYTES", labels),
        ("scores", "FP32", scores),
    ]
    for name, datatype, values in columns:
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [n, k]}
        if name in req.binary_outputs:
            if datatype == "BYTES":
                encoded = [str(v).encode() for v in values]
                blob = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
            else:
                blob = np.asarray(values, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values
        outputs.append(out)
    header: dict[str, Any] = {
        "model_name": result["model"],
        "model_version": result["model_version"],
        "parameters": {"prediction_id": result["prediction_id"]},
        "outputs": outputs,
    }
    if req.id is not None:
        header["id"] = req.id
    head = json.dumps(header).encode()
    headers = {
        "X-Model-Version": result["model_version"],
        "X-Prediction-Id": result["prediction_id"],
    }
    if not blobs:
        return head, headers, "application/json"
    headers["Inference-Header-Content-Length"] = str(len(head))
    return head + b"".join(blobs), headers, "application/octet-stream"
