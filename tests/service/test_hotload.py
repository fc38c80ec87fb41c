"""Hot-load without Ray: the follower loads the version its alias names *with the alias'
manifest hash*, and the model host keeps at most ``models_per_replica`` followers."""

from __future__ import annotations

import asyncio

import pytest

from conftest import publish_tiny_model
from service.runtime.hotload import Follower
from service.runtime.model_host import ModelHost
from service.settings import ServeSettings
from training.storage.errors import IntegrityError, NotFoundError
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore


def _follower(reg: Registry, name: str) -> Follower:
    return Follower(reg, name, alias="production", mode="fp32", poll_interval_s=60)


def test_follower_checks_the_alias_manifest_hash(store: ObjectStore) -> None:
    reg = Registry(store)
    manifest, _ = publish_tiny_model(reg, "hashed")
    follower = _follower(reg, "hashed")
    follower.load_now()
    assert follower.current is not None
    assert follower.current.version == manifest.version
    # an alias whose recorded hash is not its version's manifest: refused, old model kept
    other, _ = publish_tiny_model(reg, "hashed", promote=False)
    record, etag = reg.get_alias("hashed", "production")
    assert record is not None
    forged = record.model_copy(update={"version": other.version, "sha256": "0" * 64})
    store.put_json("models/hashed/aliases/production.json", forged.model_dump(), if_match=etag)
    with pytest.raises(IntegrityError):
        follower.load_now()
    follower.refresh()  # the poll path: counted, not raised
    assert follower.failed_loads == 1
    assert follower.current.version == manifest.version
    follower.stop()


def test_model_host_keeps_an_lru_of_followers(store: ObjectStore) -> None:
    reg = Registry(store)
    for name in ("m1", "m2"):
        publish_tiny_model(reg, name)
    host = ModelHost(
        ServeSettings(models_per_replica=1, poll_interval_s=60, numeric_mode="fp32"), reg
    )

    async def follow() -> tuple[Follower, Follower]:
        first = await host.follower("m1")
        assert await host.follower("m1") is first  # cached
        return first, await host.follower("m2")

    first, second = asyncio.run(follow())
    assert first._stop.is_set()  # evicted: it stopped polling
    assert not second._stop.is_set()
    assert list(host._lru) == ["m2"]
    second.stop()  # no poll of a store that the session stops later


def test_unknown_models_leave_nothing_behind(store: ObjectStore) -> None:
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), Registry(store))

    async def ask(n: int) -> None:
        for i in range(n):
            with pytest.raises(NotFoundError):
                await host.follower(f"made-up-{i}")

    asyncio.run(ask(50))
    assert host._loading == {}
    assert not host._lru
    assert not host.followers
