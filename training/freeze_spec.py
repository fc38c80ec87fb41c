"""Frozen-layer policies as data: what a fine-tune spec or a retrain policy names (pydantic
only, no torch: the storage layer validates retrain policies with them). How a policy is
planned against a model and applied is :mod:`training.freeze`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FreezePolicyBase(BaseModel):
    """What every freeze policy is: immutable data, nothing unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Full(FreezePolicyBase):
    """Train everything."""

    policy: Literal["full"] = "full"


class HeadOnly(FreezePolicyBase):
    """Linear probe: only the head trains; the backbone's features can be cached."""

    policy: Literal["head_only"] = "head_only"
    feature_cache: bool = True
    """Compute backbone features once and train the head on them (no augmentation then)."""


class LastNStages(FreezePolicyBase):
    """The last ``n`` backbone stages and the head train."""

    policy: Literal["last_n_stages"] = "last_n_stages"
    n: int = Field(ge=1)


class LPFT(FreezePolicyBase):
    """Linear probe for ``probe_epochs``, then everything at ``lr * ft_lr_factor``."""

    policy: Literal["lp_ft"] = "lp_ft"
    probe_epochs: int = Field(default=1, ge=1)
    ft_lr_factor: float = Field(default=0.1, gt=0, le=1)


class GradualUnfreeze(FreezePolicyBase):
    """Head first; one more stage (from the top) every ``every`` epochs."""

    policy: Literal["gradual_unfreeze"] = "gradual_unfreeze"
    every: int = Field(default=1, ge=1)


class LayerDecay(FreezePolicyBase):
    """Everything trains; stage ``k`` below the head gets ``lr * decay**k``."""

    policy: Literal["layer_decay"] = "layer_decay"
    decay: float = Field(default=0.75, gt=0, le=1)


class Patterns(FreezePolicyBase):
    """Parameters whose names match any regex (``re.search``) train; the rest is frozen."""

    policy: Literal["patterns"] = "patterns"
    trainable: list[str] = Field(min_length=1)

    @field_validator("trainable")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return value


FreezePolicy = Annotated[
    Full | HeadOnly | LastNStages | LPFT | GradualUnfreeze | LayerDecay | Patterns,
    Field(discriminator="policy"),
]


__all__ = [
    "LPFT",
    "FreezePolicy",
    "FreezePolicyBase",
    "Full",
    "GradualUnfreeze",
    "HeadOnly",
    "LastNStages",
    "LayerDecay",
    "Patterns",
]
