"""Which models keep their loaded version in a replica: the most recently used, as many as
fit a byte budget (``REFIT_SERVE__MODEL_CACHE_MB``).

Variants of one backbone share their common stages (``shared_stages``), so what a model
costs depends on what else is loaded: a head-only variant next to its parent costs its head.
The budget therefore counts the memory of the loaded versions *together*, each tensor once
(plus, for a version served as a trace or graph, that copy of its weights), and the least
recently used models are parked (their version dropped, see
:meth:`~service.runtime.hotload.Follower.park`) until the rest fit. The model used last always
stays, however large. A parked model loads again on its next request (a cold load), from the
stage cache and the resident stages where it can.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Iterable

from service.runtime.hotload import Follower
from service.runtime.served_model import ServedModel


def _storages(served: ServedModel) -> dict[object, int]:
    """What ``served`` holds, by identity: its tensors' storages and its trace or graph."""
    held: dict[object, int] = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in served.tensors()
    }
    if served.graph_key is not None:
        held[("graph", served.graph_key)] = served.graph_bytes
    return held


def resident_bytes(models: Iterable[ServedModel]) -> int:
    """Memory of ``models`` loaded together: every tensor storage, trace and graph once."""
    seen: dict[object, int] = {}
    for served in models:
        seen.update(_storages(served))
    return sum(seen.values())


class ModelCache:
    """The use order of a replica's models and the byte budget their loaded versions share."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        # weak: a follower the Serve multiplexer evicted goes away with its memory
        self._used: collections.OrderedDict[str, weakref.ref[Follower]] = collections.OrderedDict()
        self.parks = 0

    def touch(self, follower: Follower) -> None:
        """``follower``'s model was just used (or loaded): the last to be parked."""
        self._used[follower.name] = weakref.ref(follower)
        self._used.move_to_end(follower.name)

    def loaded(self) -> list[Follower]:
        """Followers holding a version, least recently used first."""
        out = []
        for name, ref in list(self._used.items()):
            follower = ref()
            if follower is None:
                del self._used[name]
            elif follower.current is not None:
                out.append(follower)
        return out

    def resident_bytes(self) -> int:
        """What the loaded versions take together (the figure the budget bounds)."""
        return resident_bytes(f.current for f in self.loaded() if f.current is not None)

    def over_budget(self) -> list[Follower]:
        """The least recently used followers to park so that the others' versions fit the
        budget (never the most recently used one)."""
        loaded = [(f, f.current) for f in self.loaded()]
        held = [(f, _storages(s)) for f, s in loaded if s is not None]
        uses: collections.Counter[object] = collections.Counter()
        size: dict[object, int] = {}
        total = 0
        for _, storages in held:
            for ptr, nbytes in storages.items():
                if uses[ptr] == 0:
                    total += nbytes
                uses[ptr] += 1
                size[ptr] = nbytes
        victims = []
        for follower, storages in held[:-1]:
            if total <= self.budget_bytes:
                break
            victims.append(follower)
            for ptr in storages:
                uses[ptr] -= 1
                if uses[ptr] == 0:
                    total -= size[ptr]
        return victims
