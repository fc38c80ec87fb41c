"""Stages held once in a replica's memory, by content.

Freeze policies keep frozen stages byte-identical to the parent's (``training.stage_digests``),
so fine-tunes of one backbone share their leading stages exactly: a head-only variant of
resnet18 differs from its parent in ~20 KB of 45 MB. When a version is loaded to serve in eager
fp32, its leading stages whose content (the prefix digest: the first k stages together) a
resident version already holds are replaced by that version's submodules, and its own copies
are freed: N variants of one trunk hold one trunk.

Safe because a served eager module is never changed in place (no conversion, no fusion after
it serves; the other modes build modules of their own), and exact because a prefix digest
covers every parameter and buffer of those stages, names, dtypes and shapes included. A
resident module is only weakly referenced here: it goes when its last version does (a version
that adopted its stages holds them).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.backbones import Stage, stages, structure
from training.stage_digests import prefix_digests
from training.storage.registry import StageDigest


@dataclass(frozen=True)
class Sharing:
    """What a loaded version holds together with versions loaded before it."""

    stages: list[str]
    """Its leading stages that are another resident version's submodules (one copy)."""
    shared_bytes: int
    """Their bytes (parameters and buffers)."""
    model_bytes: int
    """Every tensor byte of the version's model (shared ones included)."""


class SharedStages:
    """Eager modules by the prefix digests of their stages, and a checked sample of each
    resident trunk's output."""

    def __init__(self) -> None:
        self._resident: dict[str, weakref.ref[nn.Module]] = {}
        # per trunk key: features its trunk computed, finite (kept while a holder is resident)
        self._features: dict[str, tuple[weakref.ref[nn.Module], torch.Tensor]] = {}
        # per (trunk key, mode): the trunk traced for that mode (held by the versions using it)
        self._traces: dict[tuple[str, str], weakref.ref[Any]] = {}
        self._lock = threading.Lock()

    def adopt(
        self, module: nn.Module, backbone: str, num_classes: int, digests: list[StageDigest]
    ) -> Sharing:
        """Give ``module`` (a version about to serve, eager fp32) the submodules of the
        longest run of leading stages a resident module holds with the same content; what
        it now shares. Nothing is offered to the next versions before :meth:`offer`."""
        tensors = (*module.parameters(), *module.buffers())
        total = sum(t.numel() * t.element_size() for t in tensors)
        groups = _stages(backbone, num_classes)
        if [g.name for g in groups] != [d.name for d in digests]:
            return Sharing([], 0, total)  # digests of another layout: share nothing
        if not all(t.is_contiguous() for t in tensors):
            return Sharing([], 0, total)  # another memory format (digests: stored tensors)
        keys = _keys(backbone, digests)
        with self._lock:
            shared: list[Stage] = []
            for k in range(len(keys), 0, -1):
                ref = self._resident.get(keys[k - 1])
                other = ref() if ref is not None else None
                if other is not None and other is not module:
                    shared = groups[:k] if _adopt(module, other, groups[:k]) else []
                    break
        adopted = sum(_bytes(module, g) for g in shared)
        return Sharing([g.name for g in shared], adopted, total)

    def held(
        self, backbone: str, num_classes: int, digests: list[StageDigest]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per stage name, the tensors (state-dict names) of the longest run of leading
        stages a resident module holds with the content ``digests`` name: a version being
        loaded need not read those stages (they are adopted after)."""
        groups = _stages(backbone, num_classes)
        if [g.name for g in groups] != [d.name for d in digests]:
            return {}
        keys = _keys(backbone, digests)
        with self._lock:
            for k in range(len(keys), 0, -1):
                ref = self._resident.get(keys[k - 1])
                other = ref() if ref is not None else None
                if other is not None:
                    break
            else:
                return {}
        state = other.state_dict()
        return {g.name: {n: t for n, t in state.items() if g.owns(n)} for g in groups[:k]}

    def offer(
        self,
        module: nn.Module,
        backbone: str,
        digests: list[StageDigest],
        trunk: tuple[str, torch.Tensor] | None = None,
    ) -> None:
        """Make ``module``'s stages (a version that passed its checks) available to the
        versions loaded next, and ``trunk``: its trunk key and features that trunk computed
        (finite), so that a version sharing the whole trunk checks only its head."""
        with self._lock:
            for key in _keys(backbone, digests):  # the newest holder: the likeliest to stay
                self._resident[key] = weakref.ref(module)
            if trunk is not None:
                self._features[trunk[0]] = (weakref.ref(module), trunk[1])
            self._resident = {k: r for k, r in self._resident.items() if r() is not None}
            self._features = {k: v for k, v in self._features.items() if v[0]() is not None}

    def trace(self, trunk_key: str, mode: str, make: Callable[[], Any] | None = None) -> Any:
        """The trunk with this content prepared for ``mode`` in this process (a trace, or a
        graph cut before its head): the one a resident version runs, else ``make()`` (then
        offered to the next ones; None: nothing made). A traced trunk is a function of the
        trunk's content and the mode; a graph's, of the version it was cut from too: each
        version passes its own agreement gate with the one it gets."""
        with self._lock:
            ref = self._traces.get((trunk_key, mode))
            held = ref() if ref is not None else None
        if held is not None or make is None:
            return held
        made = make()  # seconds: outside the lock (two first loads may both make one: harmless)
        if made is None:
            return None
        with self._lock:
            self._traces[(trunk_key, mode)] = weakref.ref(made)
            self._traces = {k: r for k, r in self._traces.items() if r() is not None}
        return made

    def features(self, trunk_key: str) -> torch.Tensor | None:
        """Finite features a resident trunk with this key computed (None: none resident)."""
        with self._lock:
            held = self._features.get(trunk_key)
        return held[1] if held is not None and held[0]() is not None else None


def _keys(backbone: str, digests: list[StageDigest]) -> list[str]:
    return [f"{backbone}/{p}" for p in prefix_digests(digests)]


@functools.lru_cache(maxsize=64)
def _stages(backbone: str, num_classes: int) -> list[Stage]:
    """The stages of an architecture, built once per architecture (tens of milliseconds)."""
    return stages(structure(backbone, num_classes=num_classes), backbone)


def _parts(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def _adopt(module: nn.Module, other: nn.Module, groups: list[Stage]) -> bool:
    """Point ``module``'s submodules and parameters of ``groups`` at ``other``'s (all of them,
    or none when a part is of another kind or shape: the layouts differ)."""
    moves = []
    for group in groups:
        for path in group.prefixes:
            mine_parent, leaf = _parts(module, path)
            theirs_parent, _ = _parts(other, path)
            mine, theirs = getattr(mine_parent, leaf), getattr(theirs_parent, leaf)
            if type(mine) is not type(theirs) or not isinstance(theirs, nn.Module | nn.Parameter):
                return False
            if isinstance(theirs, nn.Parameter) and theirs.shape != mine.shape:
                return False
            moves.append((mine_parent, leaf, theirs))
    for parent, leaf, theirs in moves:
        setattr(parent, leaf, theirs)
    return True


def _bytes(module: nn.Module, group: Stage) -> int:
    total = 0
    for path in group.prefixes:
        parent, leaf = _parts(module, path)
        part = getattr(parent, leaf)
        if isinstance(part, nn.Parameter):
            total += part.numel() * part.element_size()
        else:
            tensors = (*part.parameters(), *part.buffers())
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@functools.cache
def shared_stages() -> SharedStages:
    """This process's stages held once (every model a replica loads)."""
    return SharedStages()
