"""torchvision backbones by name, their stages, and their classifier heads.

A *stage* is a named group of parameter-name prefixes, ordered from input to output, with the
classifier head always last. Freeze policies are expressed in stages, so they mean the same
thing on every family. Every parameter and buffer belongs to exactly one stage.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from training.storage.errors import SpecError
from training.tv import models

# name -> family. Families share stage layout and head location.
BACKBONES: dict[str, str] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "mobilenet_v3_small": "mobilenet_v3",
    "mobilenet_v3_large": "mobilenet_v3",
    "efficientnet_b0": "efficientnet",
    "efficientnet_b1": "efficientnet",
    "efficientnet_b2": "efficientnet",
    "convnext_tiny": "convnext",
    "convnext_small": "convnext",
    "regnet_y_400mf": "regnet",
    "regnet_y_800mf": "regnet",
    "regnet_x_400mf": "regnet",
    "vit_b_16": "vit",
}

# Where the classifier head lives; it is what a new task replaces and what head-only trains.
HEAD_MODULE: dict[str, str] = {
    "resnet": "fc",
    "regnet": "fc",
    "mobilenet_v3": "classifier",
    "efficientnet": "classifier",
    "convnext": "classifier",
    "vit": "heads",
}


@dataclass(frozen=True)
class Stage:
    """A named group of parameters: every tensor whose name starts with one of ``prefixes``."""

    name: str
    prefixes: tuple[str, ...]

    def owns(self, tensor_name: str) -> bool:
        """Whether a parameter or buffer name belongs to this stage."""
        return any(tensor_name == p or tensor_name.startswith(p + ".") for p in self.prefixes)


def family_of(backbone: str) -> str:
    """The family of a backbone name; SpecError listing valid names otherwise."""
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise SpecError(
            f"unknown backbone {backbone!r}; valid: {', '.join(sorted(BACKBONES))}",
            field="base.backbone",
        ) from None


def build_backbone(backbone: str, *, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision model with a ``num_classes``-way head."""
    family_of(backbone)
    if num_classes < 2:
        raise SpecError("a classifier needs at least 2 classes", field="num_classes")
    model: nn.Module = models.get_model(backbone, weights=None, num_classes=num_classes)
    return model


def structure(backbone: str, *, num_classes: int) -> nn.Module:
    """The model's structure built on the meta device (nothing allocated, no random init),
    or on the CPU for a builder that computes with tensor values (RegNet's init)."""
    try:
        with torch.device("meta"):
            return build_backbone(backbone, num_classes=num_classes)
    except NotImplementedError:
        return build_backbone(backbone, num_classes=num_classes)


def build_with_weights(
    backbone: str, state: Mapping[str, torch.Tensor], *, num_classes: int
) -> nn.Module:
    """The model holding ``state`` (strict): a copy of the architecture's structure on the
    meta device filled by assignment where the builder allows it, so no random init is
    computed only to be overwritten (a fifth of a second for resnet18 on a busy CPU) and the
    structure is built once per architecture. The module then holds ``state``'s tensors
    themselves: hand it tensors nothing else changes."""
    template = _meta_structure(backbone, num_classes)
    if template is not None:
        module = copy.deepcopy(template)
        module.load_state_dict(state, strict=True, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module
    module = build_backbone(backbone, num_classes=num_classes)
    module.load_state_dict(state, strict=True)
    return module


@functools.lru_cache(maxsize=16)
def _meta_structure(backbone: str, num_classes: int) -> nn.Module | None:
    """The architecture on the meta device, built once (tens of milliseconds each time);
    None where the builder computes with tensor values. Only ever copied, never changed."""
    module = structure(backbone, num_classes=num_classes)
    if all(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return module
    return None


def _has_stride2(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2) for m in module.modules())


def _feature_stages(model: nn.Module) -> list[Stage]:
    """Stages of a ``features`` Sequential (mobilenet_v3, efficientnet, convnext): a block
    that downsamples (a stride-2 conv) starts a new stage; the final 1x1 conv joins the last."""
    features: nn.Sequential = model.get_submodule("features")  # type: ignore[assignment]
    n = len(features)
    groups: list[list[str]] = []
    for i in range(1, n):
        name = f"features.{i}"
        if not groups or (i < n - 1 and _has_stride2(features[i])):
            groups.append([name])
        else:
            groups[-1].append(name)
    return [Stage("stem", ("features.0",))] + [
        Stage(f"stage{k + 1}", tuple(g)) for k, g in enumerate(groups)
    ]


def stages(model: nn.Module, backbone: str) -> list[Stage]:
    """The ordered stages of a model built by :func:`build_backbone`, head last."""
    family = family_of(backbone)
    head = Stage("head", (HEAD_MODULE[family],))
    body: list[Stage]
    if family == "resnet":
        body = [Stage("stem", ("conv1", "bn1"))] + [
            Stage(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)
        ]
    elif family == "regnet":
        blocks = [n for n, _ in model.trunk_output.named_children()]  # type: ignore[union-attr]
        body = [Stage("stem", ("stem",))] + [Stage(b, (f"trunk_output.{b}",)) for b in blocks]
    elif family == "vit":
        layers = [n for n, _ in model.encoder.layers.named_children()]  # type: ignore[union-attr]
        per = max(1, len(layers) // 4)
        body = [Stage("stem", ("conv_proj", "class_token", "encoder.pos_embedding"))]
        for k in range(0, len(layers), per):
            prefixes = tuple(f"encoder.layers.{n}" for n in layers[k : k + per])
            body.append(Stage(f"blocks{k // per + 1}", prefixes))
        last = body[-1]
        body[-1] = Stage(last.name, (*last.prefixes, "encoder.ln"))
    else:
        body = _feature_stages(model)
    return [*body, head]


def stage_runs(model: nn.Module, backbone: str) -> list[nn.Module] | None:
    """The model's trunk as one runnable piece per stage of :func:`stages` (head excluded):
    each holds exactly that stage's submodules (the model's own, shared), the last one ends
    with the pooling the head takes, so ``head(runs[-1](...runs[0](x)))`` is ``model(x)``.
    None for a family whose trunk is not a chain of its stages (vit: the class token)."""
    family = family_of(backbone)
    get = model.get_submodule
    pieces: list[list[nn.Module]]
    if family == "resnet":
        pieces = [[get("conv1"), get("bn1"), get("relu"), get("maxpool")]]
        pieces += [[get(f"layer{i}")] for i in range(1, 5)]
        pieces[-1] += [get("avgpool"), nn.Flatten(1)]
    elif family == "regnet":
        pieces = [[get("stem")]] + [[m] for m in get("trunk_output").children()]
        pieces[-1] += [get("avgpool"), nn.Flatten(1)]
    elif family in ("mobilenet_v3", "efficientnet", "convnext"):
        body = [s for s in stages(model, backbone) if s.name != "head"]
        pieces = [[get(p) for p in stage.prefixes] for stage in body]
        pieces[-1].append(get("avgpool"))
        if family != "convnext":  # convnext's classifier flattens itself
            pieces[-1].append(nn.Flatten(1))
    else:
        return None
    return [nn.Sequential(*piece) for piece in pieces]


def head_module(model: nn.Module, backbone: str) -> nn.Module:
    """The classifier head submodule."""
    head: nn.Module = getattr(model, HEAD_MODULE[family_of(backbone)])
    return head


def trunk(model: nn.Module, backbone: str) -> nn.Module:
    """The model without its head: same weights (shared modules), outputs the head's input.

    Used for the head-only feature cache: ``head(trunk(x)) == model(x)``.
    """
    name = HEAD_MODULE[family_of(backbone)]
    t = copy.copy(model)
    t._modules = dict(model._modules)  # shallow copy must not edit the original's children
    setattr(t, name, nn.Identity())
    return t
