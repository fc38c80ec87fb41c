"""Frozen-layer policies (the data: :mod:`training.freeze_spec`) turned into a plan and applied
in place.

Two kinds of freezing, kept apart on purpose:

* **permanent** - parameters no policy phase ever trains get ``requires_grad=False`` before the
  model is wrapped in DDP, are left out of the optimizer, and their BatchNorm layers keep their
  running statistics (eval mode that survives ``model.train()``);
* **phased** (``lp_ft``, ``gradual_unfreeze``) - every parameter that trains at *some* point is
  known to DDP from the start; a phase only sets its stage's learning-rate factor to 0, drops its
  gradients before the optimizer step (so no update, no weight decay, no optimizer state) and
  keeps its BatchNorm statistics frozen. DDP's parameter set never changes mid-run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from training.backbones import Stage, stages
from training.freeze_spec import (
    LPFT,
    FreezePolicyBase,
    GradualUnfreeze,
    HeadOnly,
    LastNStages,
    LayerDecay,
    Patterns,
)
from training.storage.errors import SpecError


@dataclass(frozen=True)
class FreezePlan:
    """A policy resolved against one model: which stages train when, and at what lr factor."""

    policy: FreezePolicyBase
    stages: tuple[Stage, ...]
    trainable: frozenset[str]
    """Parameter names that train in at least one epoch (``requires_grad=True``)."""

    @property
    def head_index(self) -> int:
        """Index of the head stage (always last)."""
        return len(self.stages) - 1

    def stage_factor(self, stage_index: int, epoch: int) -> float:
        """Learning-rate factor of a stage in an epoch (0-based); 0 means frozen then."""
        p, head = self.policy, self.head_index
        depth = head - stage_index  # 0 for the head, 1 for the stage below it, ...
        if isinstance(p, LPFT):
            if epoch < p.probe_epochs:
                return 1.0 if depth == 0 else 0.0
            return p.ft_lr_factor
        if isinstance(p, GradualUnfreeze):
            return 1.0 if depth <= epoch // p.every else 0.0
        if isinstance(p, LayerDecay):
            return float(p.decay**depth)
        return 1.0

    def stage_of(self, tensor_or_module_name: str) -> int:
        """Index of the stage that owns a parameter, buffer or module name."""
        return next(i for i, s in enumerate(self.stages) if s.owns(tensor_or_module_name))

    def bn_frozen(self, module_name: str, param_names: list[str], epoch: int) -> bool:
        """Whether a BatchNorm layer keeps frozen statistics in ``epoch``: its own parameters
        never train (permanent), or its stage is frozen by the current phase."""
        if param_names and not any(p in self.trainable for p in param_names):
            return True
        stage = self.stage_of(module_name)
        if not param_names and not any(self.stages[stage].owns(n) for n in self.trainable):
            return True
        return self.stage_factor(stage, epoch) == 0.0

    @property
    def uses_feature_cache(self) -> bool:
        """Whether head-only training runs on cached backbone features."""
        return isinstance(self.policy, HeadOnly) and self.policy.feature_cache


def plan_freeze(policy: FreezePolicyBase, model: nn.Module, backbone: str) -> FreezePlan:
    """Resolve a policy on a model; SpecError (field ``freeze.*``) when it cannot apply."""
    st = tuple(stages(model, backbone))
    head = len(st) - 1
    names = [n for n, _ in model.named_parameters()]

    def in_stages(indices: set[int]) -> frozenset[str]:
        return frozenset(n for n in names if any(st[i].owns(n) for i in indices))

    if isinstance(policy, HeadOnly):
        trainable = in_stages({head})
    elif isinstance(policy, LastNStages):
        if policy.n > head:
            raise SpecError(
                f"{backbone} has {head} stages below the head "
                f"({', '.join(s.name for s in st[:head])}); n must be 1..{head}",
                field="freeze.n",
            )
        trainable = in_stages(set(range(head - policy.n, head + 1)))
    elif isinstance(policy, Patterns):
        regexes = [re.compile(p) for p in policy.trainable]
        trainable = frozenset(n for n in names if any(r.search(n) for r in regexes))
        if not trainable:
            raise SpecError(
                f"no parameter of {backbone} matches; names look like {names[0]!r}, {names[-1]!r}",
                field="freeze.trainable",
            )
    else:  # full, lp_ft, gradual_unfreeze, layer_decay: all parameters train at some point
        trainable = frozenset(names)
    return FreezePlan(policy=policy, stages=st, trainable=trainable)


class _StatsFrozen:
    """Mixin of the frozen BatchNorm classes below: ``train()`` keeps the layer in eval mode,
    so its running statistics never move, even after ``model.train()`` or DDP's ``train()``.
    A class of its own (rather than a ``train`` bound onto the instance) keeps the model
    picklable and shows the freezing in ``repr``."""

    def train(self, mode: bool = True) -> Any:
        """Always eval: the statistics of a frozen stage stay as the base left them."""
        return super().train(False)  # type: ignore[misc]

    def extra_repr(self) -> str:
        """The layer's own description, marked frozen."""
        return f"{super().extra_repr()}, stats=frozen"  # type: ignore[misc]


class StatsFrozenBatchNorm1d(_StatsFrozen, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose running statistics are frozen."""


class StatsFrozenBatchNorm2d(_StatsFrozen, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics are frozen."""


class StatsFrozenBatchNorm3d(_StatsFrozen, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose running statistics are frozen."""


class StatsFrozenSyncBatchNorm(_StatsFrozen, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` whose running statistics are frozen."""


_FROZEN_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: StatsFrozenBatchNorm1d,
    nn.BatchNorm2d: StatsFrozenBatchNorm2d,
    nn.BatchNorm3d: StatsFrozenBatchNorm3d,
    nn.SyncBatchNorm: StatsFrozenSyncBatchNorm,
}
_LIVE_CLASS = {frozen: live for live, frozen in _FROZEN_CLASS.items()}


def _set_stats_frozen(module: nn.Module, frozen: bool) -> None:
    # Swapping the class changes only behaviour: parameters, buffers and state_dict keys
    # are those of the plain layer, so checkpoints load into either.
    cls = type(module)
    if frozen and cls in _FROZEN_CLASS:
        module.__class__ = _FROZEN_CLASS[cls]
    elif not frozen and cls in _LIVE_CLASS:
        module.__class__ = _LIVE_CLASS[cls]  # the next model.train() trains it again
    if frozen:
        module.eval()


def set_frozen_batchnorm(model: nn.Module, plan: FreezePlan, epoch: int) -> int:
    """Freeze the BatchNorm statistics of the stages frozen in ``epoch``; unfreeze the others.

    Returns how many BatchNorm layers are frozen. Survives later ``model.train()`` calls.
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        frozen = plan.bn_frozen(name, own, epoch)
        _set_stats_frozen(module, frozen)
        count += frozen
    return count


def apply_freeze(model: nn.Module, plan: FreezePlan) -> None:
    """In place: ``requires_grad`` from the plan, BatchNorm freezing for epoch 0."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in plan.trainable)
    set_frozen_batchnorm(model, plan, epoch=0)


_NO_DECAY = re.compile(r"(^|\.)(bias|bn\d*|norm\w*|ln\w*|class_token|pos_embedding)(\.|$)")


def param_groups(model: nn.Module, plan: FreezePlan, *, weight_decay: float) -> list[dict]:
    """Optimizer groups: one per (stage, decay/no-decay), only for trainable parameters.

    Each group carries ``stage`` so the schedule can scale it per epoch. Biases, norm weights
    and embeddings get no weight decay.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if name not in plan.trainable:
            continue
        stage = plan.stage_of(name)
        decay = param.ndim > 1 and not _NO_DECAY.search(name)
        group = groups.setdefault(
            (stage, decay),
            {"params": [], "stage": stage, "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def drop_frozen_grads(optimizer_groups: list[dict], plan: FreezePlan, epoch: int) -> None:
    """Before ``optimizer.step()``: phase-frozen groups lose their gradients, so the step
    leaves them (and their optimizer state) untouched."""
    for group in optimizer_groups:
        if plan.stage_factor(group["stage"], epoch) == 0.0:
            for p in group["params"]:
                p.grad = None


__all__ = [
    "FreezePlan",
    "StatsFrozenBatchNorm1d",
    "StatsFrozenBatchNorm2d",
    "StatsFrozenBatchNorm3d",
    "StatsFrozenSyncBatchNorm",
    "apply_freeze",
    "drop_frozen_grads",
    "param_groups",
    "plan_freeze",
    "set_frozen_batchnorm",
]
