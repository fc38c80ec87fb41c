"""The vendored KubeRay and prometheus-operator JSON Schemas (k8s/schemas)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parent.parent / "k8s" / "schemas"


@cache
def index() -> dict[str, str]:
    """``apiVersion/Kind`` -> schema file."""
    data: dict[str, str] = json.loads((SCHEMAS / "index.json").read_text())
    return data


@cache
def validator(key: str) -> jsonschema.Draft202012Validator:
    """A validator for ``apiVersion/Kind`` (KeyError for kinds without a schema here)."""
    schema = json.loads((SCHEMAS / index()[key]).read_text())
    return jsonschema.Draft202012Validator(schema)


def strip_nulls(obj: Any) -> Any:
    """Drop null-valued fields, as the API server does before validating."""
    if isinstance(obj, dict):
        return {k: strip_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [strip_nulls(v) for v in obj]
    return obj
