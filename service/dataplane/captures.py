"""Capture policies and captured predictions, as the admin API uses them. Every store call
runs off the event loop (:func:`~service.dataplane.store_calls.store_call`)."""

from __future__ import annotations

from typing import Any

from service.dataplane.store_calls import store_call
from training.storage.captures import CapturePolicy, CaptureRecord, Captures
from training.storage.registry import Registry

MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class CaptureUseCases:
    """Read and set a model's capture policy; list and read what was captured."""

    def __init__(
        self, registry: Registry, default: CapturePolicy, *, alias: str, max_image_bytes: int
    ) -> None:
        self.registry, self.default, self.alias = registry, default, alias
        self.captures = Captures(registry.store)
        self.max_image_bytes = max_image_bytes

    async def policy(self, model: str) -> dict[str, Any]:
        """The policy in force for ``model``, and where it comes from (stored or default)."""

        def read() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            stored = self.captures.policy(model)
            policy = stored if stored is not None else self.default
            return {
                "model": model,
                "source": "stored" if stored is not None else "default",
                "policy": policy.model_dump(),
                "enabled": policy.enabled,
            }

        return await store_call(read)

    async def set_policy(self, model: str, policy: CapturePolicy) -> dict[str, Any]:
        """Store ``model``'s policy; every replica applies it within ``capture.refresh_s``."""

        def write() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            self.captures.set_policy(model, policy)
            return {
                "model": model,
                "source": "stored",
                "policy": policy.model_dump(),
                "enabled": policy.enabled,
            }

        return await store_call(write)

    async def list(self, model: str, *, after: str | None, limit: int) -> dict[str, Any]:
        """The model's captures, oldest first, after a prediction id (a page)."""

        def read() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            items = [
                {"prediction_id": p, "index": i}
                for p, i in self.captures.list(model, after=after, limit=limit)
            ]
            ids = {item["prediction_id"] for item in items}
            nxt = items[-1]["prediction_id"] if len(ids) == limit else None
            return {"model": model, "captures": items, "next_after": nxt}

        return await store_call(read)

    async def record(self, model: str, prediction_id: str, index: int) -> CaptureRecord:
        """One capture's record (404 when that prediction was not captured)."""
        return await store_call(self.captures.get, model, prediction_id, index)

    async def image(self, model: str, prediction_id: str, index: int) -> tuple[bytes, str]:
        """One capture's image bytes and media type."""

        def read() -> tuple[bytes, str]:
            record = self.captures.get(model, prediction_id, index)
            data = self.captures.image(record, max_bytes=self.max_image_bytes)
            return data, MEDIA_TYPES[record.image]

        return await store_call(read)
