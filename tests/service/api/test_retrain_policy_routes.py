"""Retrain policies over HTTP, in process (a real SeaweedFS): stored per model through the
admin API, and refused when they could retrain in a loop or name data outside the bucket."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api_app import ADMIN, LABEL, PREDICT, bearer
from training.storage.retrain_policies import RetrainPolicy

pytestmark = pytest.mark.anyio
PATH = "/v1/models/digits/retrain-policy"


async def test_set_read_and_remove(
    published_client: httpx.AsyncClient, published_app: tuple[Any, dict[str, Any]]
) -> None:
    admin = bearer(ADMIN)
    assert (await published_client.get(PATH, headers=admin)).json()["policy"] is None
    store = published_app[1]["store"]
    policy = {
        "every_n_labels": 50,
        "accuracy_below": 0.8,
        "cooldown_s": 600,
        "base_dataset": store.uri("datasets/digits/"),
    }
    r = await published_client.put(PATH, json=policy, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["every_n_labels"] == 50
    got = (await published_client.get(PATH, headers=admin)).json()["policy"]
    assert RetrainPolicy.model_validate(got).accuracy_below == 0.8
    assert store.exists("policies/digits/retrain.json")
    assert (await published_client.delete(PATH, headers=admin)).json()["policy"] is None
    assert (await published_client.get(PATH, headers=admin)).json()["policy"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),  # no trigger: would never fire, or is a mistake
        ({"every_n_labels": 50, "cooldown_s": 10}, "cooldown_s"),  # could loop
        ({"every_s": 3600, "cooldown_s": 7200}, "body"),  # a schedule inside its cooldown
        ({"every_n_labels": 5}, "every_n_labels"),
        ({"accuracy_below": 1.5}, "accuracy_below"),
        ({"every_n_labels": 50, "max_concurrent": 0}, "max_concurrent"),
        ({"every_n_labels": 50, "retrain": True}, "retrain"),
    ],
)
async def test_policies_that_could_loop_or_are_malformed_get_400(
    published_client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    r = await published_client.put(PATH, json=body, headers=bearer(ADMIN))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


async def test_data_outside_the_bucket_unknown_models_and_scopes(
    published_client: httpx.AsyncClient,
) -> None:
    admin = bearer(ADMIN)
    r = await published_client.put(
        PATH, json={"every_n_labels": 50, "base_dataset": "s3://elsewhere/x/"}, headers=admin
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "base_dataset"
    r = await published_client.put(
        "/v1/models/nosuch/retrain-policy", json={"every_n_labels": 50}, headers=admin
    )
    assert r.status_code == 404
    for token in (PREDICT, LABEL):
        assert (await published_client.get(PATH, headers=bearer(token))).status_code == 403
    assert (await published_client.get(PATH)).status_code == 401
