"""Retrain policies, as the admin API uses them. Every store call runs off the event loop.

The job runner evaluates them (``service.control``): stored here, read there."""

from __future__ import annotations

from typing import Any

from service.dataplane.store_calls import store_call
from training.storage.errors import IntegrityError
from training.storage.registry import Registry
from training.storage.retrain_policies import RetrainPolicies, RetrainPolicy


class RetrainPolicyUseCases:
    """Read, set and remove a model's retrain policy."""

    def __init__(self, registry: Registry, *, alias: str) -> None:
        self.registry, self.alias = registry, alias
        self.policies = RetrainPolicies(registry.store)

    def _view(self, model: str, policy: RetrainPolicy | None) -> dict[str, Any]:
        try:
            state = self.policies.state(model)
        except IntegrityError:  # the runner starts it again; the policy itself is readable
            state = None
        return {
            "model": model,
            "policy": policy.model_dump() if policy else None,
            "state": state.model_dump(mode="json") if state else None,
        }

    async def get(self, model: str) -> dict[str, Any]:
        """The model's policy (``policy: null`` when it has none)."""

        def read() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            return self._view(model, self.policies.get(model))

        return await store_call(read)

    async def set(self, model: str, policy: RetrainPolicy) -> dict[str, Any]:
        """Store the model's policy; its base dataset must lie under the bucket and prefix."""

        def write() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            if policy.base_dataset is not None:  # refuses other buckets, '..', odd characters
                self.registry.store.key_from_uri(policy.base_dataset, field="base_dataset")
            return self._view(model, self.policies.set(model, policy))

        return await store_call(write)

    async def delete(self, model: str) -> dict[str, Any]:
        """Remove the model's policy."""

        def remove() -> dict[str, Any]:
            self.registry.serving(model, self.alias)
            self.policies.delete(model)
            return self._view(model, None)

        return await store_call(remove)
