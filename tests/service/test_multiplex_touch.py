"""The replica takes a model it serves from its host between passes through Serve's multiplex
wrapper (which records a Ray metric on every call); the wrapper still sees each model in use
at least every ``MULTIPLEX_TOUCH_S``, and every model it evicted."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from service import deployments
from service.runtime.hotload import Follower
from service.settings import RefitSettings


class _Replica:
    """A ``Classifier`` without Serve: its ``follower`` method over a counting wrapper."""

    follower = deployments.Classifier.func_or_class.follower

    def __init__(self) -> None:
        self.settings = RefitSettings()
        self.host = types.SimpleNamespace(followers={})
        self.wrapped: list[str] = []
        self._touched: dict[str, float] = {}
        self._listener = object()  # the notice listener counts as started

    async def _follower(self, model: str) -> Follower:  # Serve's wrapper: load or touch
        self.wrapped.append(model)
        if model not in self.host.followers:
            self.host.followers[model] = Follower(
                None,  # type: ignore[arg-type]  # never loads here
                model,
                alias="live",
                mode="fp32",
                poll_interval_s=60,
            )
        follower: Follower = self.host.followers[model]
        return follower


def test_the_wrapper_sees_each_model_once_per_interval_and_every_eviction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(deployments.time, "monotonic", lambda: clock[0])
    replica: Any = _Replica()

    async def calls() -> None:
        first = await replica.follower("a")
        for _ in range(50):  # within the interval: the host's follower, no wrapper call
            assert await replica.follower("a") is first
        assert replica.wrapped == ["a"]
        await replica.follower("b")  # another model: its own first pass
        assert replica.wrapped == ["a", "b"]
        clock[0] += deployments.MULTIPLEX_TOUCH_S  # the interval passed: touched again
        assert await replica.follower("a") is first
        assert replica.wrapped == ["a", "b", "a"]
        first.stop()  # Serve evicted it (or the host parked it): through the wrapper again
        await replica.follower("a")
        await replica.follower("a")
        assert replica.wrapped == ["a", "b", "a", "a", "a"]

    asyncio.run(calls())
