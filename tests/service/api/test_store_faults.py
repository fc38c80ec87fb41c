"""A frozen store (SIGSTOP on this test's own SeaweedFS, for 30 s) under predict load of a
loaded model: predictions keep answering, probes stay fast, and calls that need the store
fail within their request-path bound with 503 and ``Retry-After``."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api_app import PREDICT, build_inprocess_app
from conftest import png_bytes
from service.embedded_store import Connection, EmbeddedStore
from service.settings import RefitSettings

pytestmark = [pytest.mark.fault, pytest.mark.anyio]

FREEZE_S = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def own_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedStore, Connection]]:
    """A SeaweedFS of this test's own: freezing it touches no other test's store."""
    store = EmbeddedStore(tmp_path_factory.mktemp("frozen"), bucket="refit")
    conn = store.start()
    yield store, conn
    store.stop()


async def test_frozen_store_under_load(own_store: tuple[EmbeddedStore, Connection]) -> None:
    embedded, conn = own_store
    assert embedded.process is not None
    app, parts = build_inprocess_app(RefitSettings(s3=conn.s3_settings(prefix="f")), publish=True)
    auth = {"Authorization": f"Bearer {PREDICT}"}
    body = {"images": [base64.b64encode(png_bytes(1)).decode()]}
    cold, cold_parts = build_inprocess_app(RefitSettings(s3=conn.s3_settings(prefix="g")))
    transport = httpx.ASGITransport(app=app)
    stats: dict[str, Any] = {"predicts": 0, "failed": [], "health": [], "metadata": []}
    async with httpx.AsyncClient(transport=transport, base_url="http://refit", timeout=60) as c:
        assert (
            await c.post("/v1/models/digits/predict", json=body, headers=auth)
        ).status_code == 200
        os.kill(embedded.process.pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + FREEZE_S

            async def predict() -> None:
                while time.monotonic() < end:
                    r = await c.post("/v1/models/digits/predict", json=body, headers=auth)
                    stats["predicts"] += 1
                    if r.status_code != 200:
                        stats["failed"].append(r.status_code)

            async def probe() -> None:
                while time.monotonic() < end:
                    start = time.monotonic()
                    r = await c.get("/healthz")
                    stats["health"].append((r.status_code, time.monotonic() - start))
                    await asyncio.sleep(0.2)

            async def metadata() -> None:
                while time.monotonic() < end - 8:
                    start = time.monotonic()
                    r = await c.get("/v2/models/digits", headers=auth)
                    stats["metadata"].append(
                        (r.status_code, r.headers.get("retry-after"), time.monotonic() - start)
                    )

            await asyncio.gather(*(predict() for _ in range(4)), probe(), metadata())
            ready = await c.get("/readyz")  # a model is loaded: it can serve
            cold_transport = httpx.ASGITransport(app=cold)
            async with httpx.AsyncClient(transport=cold_transport, base_url="http://r") as cc:
                cold_ready = await cc.get("/readyz", timeout=30)  # nothing loaded, no store
        finally:
            os.kill(embedded.process.pid, signal.SIGCONT)
        parts["close"]()
        cold_parts["close"]()
    health = sorted(seconds for _, seconds in stats["health"])
    p99 = health[int(0.99 * (len(health) - 1))]
    print(
        f"\nfrozen {FREEZE_S:.0f} s: {stats['predicts']} predicts, {len(stats['failed'])} failed; "
        f"healthz p99 {p99 * 1e3:.0f} ms over {len(health)}; metadata "
        f"{[(s, round(t, 1)) for s, _, t in stats['metadata']]}"
    )
    assert stats["predicts"] > 0
    assert stats["failed"] == []
    assert all(status == 200 for status, _ in stats["health"])
    assert p99 < 1.0
    assert stats["metadata"], "no metadata call finished while the store was frozen"
    # 2 attempts x (1 s connect + 3 s read), with botocore's backoff between them
    for status, retry_after, seconds in stats["metadata"]:
        assert (status, retry_after) == (503, "1")
        assert seconds < 12
    assert ready.status_code == 200
    assert (cold_ready.status_code, cold_ready.json()) == (503, {"ready": False})
    assert cold_ready.headers["retry-after"] == "1"  # like every 503
