"""Retrain policies over HTTP, in process (a real SeaweedFS): stored per model through the
admin API, and refused when they could retrain in a loop or name data outside the bucket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from api_app import ADMIN, LABEL, PREDICT, build_inprocess_app
from service.settings import RefitSettings
from training.storage.retrain_policies import RetrainPolicy

pytestmark = pytest.mark.anyio
PATH = "/v1/models/digits/retrain-policy"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app_and_parts(settings: RefitSettings) -> Iterator[tuple[Any, dict[str, Any]]]:
    app, parts = build_inprocess_app(settings, publish=True)
    yield app, parts
    parts["runner"].close()


@pytest.fixture
async def client(app_and_parts: tuple[Any, dict[str, Any]]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_and_parts[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://refit") as c:
        yield c


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_set_read_and_remove(
    client: httpx.AsyncClient, app_and_parts: tuple[Any, dict[str, Any]]
) -> None:
    admin = _auth(ADMIN)
    assert (await client.get(PATH, headers=admin)).json()["policy"] is None
    store = app_and_parts[1]["store"]
    policy = {
        "every_n_labels": 50,
        "accuracy_below": 0.8,
        "cooldown_s": 600,
        "base_dataset": store.uri("datasets/digits/"),
    }
    r = await client.put(PATH, json=policy, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["every_n_labels"] == 50
    got = (await client.get(PATH, headers=admin)).json()["policy"]
    assert RetrainPolicy.model_validate(got).accuracy_below == 0.8
    assert store.exists("policies/digits/retrain.json")
    assert (await client.delete(PATH, headers=admin)).json()["policy"] is None
    assert (await client.get(PATH, headers=admin)).json()["policy"] is None


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
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    r = await client.put(PATH, json=body, headers=_auth(ADMIN))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


async def test_data_outside_the_bucket_unknown_models_and_scopes(client: httpx.AsyncClient) -> None:
    admin = _auth(ADMIN)
    r = await client.put(
        PATH, json={"every_n_labels": 50, "base_dataset": "s3://elsewhere/x/"}, headers=admin
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "base_dataset"
    r = await client.put(
        "/v1/models/nosuch/retrain-policy", json={"every_n_labels": 50}, headers=admin
    )
    assert r.status_code == 404
    for token in (PREDICT, LABEL):
        assert (await client.get(PATH, headers=_auth(token))).status_code == 403
    assert (await client.get(PATH)).status_code == 401
