"""The content identity of a version's stages: the sha256 of each stage's tensors.

Freeze policies keep frozen tensors byte-identical to the parent's, so two versions of one
backbone whose leading stages hash the same share those stages exactly: one copy in a
replica's memory, one trunk pass for both (issue 28). Every version records the digests at
publish (``Manifest.stages``, the stages of :func:`training.backbones.stages`, head last); a
version published before they were recorded gets them computed when it is loaded.

A stage's digest covers its parameters and buffers, sorted by name, each as its name, dtype,
shape and bytes (the dtype stored: a bf16 copy is other content). :func:`prefix_digests`
chains them: the k-th is the identity of the first k stages together, what a trunk cache keys
on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from training.backbones import stages, structure
from training.storage.registry import StageDigest
from training.storage.stage_files import StageTensors


def update_with_tensors(h: hashlib._Hash, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed named tensors to a hash in name order: name, dtype, shape, then the bytes."""
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def stage_digests(
    state: Mapping[str, torch.Tensor], backbone: str, num_classes: int
) -> list[StageDigest]:
    """The digest of every stage of ``state`` (a state dict of ``backbone``), in stage order,
    head last. ValueError when a tensor belongs to no stage or to two: the stages must
    partition the model, or two versions could share a stage that differs."""
    split = split_stages(state, backbone, num_classes)
    return [StageDigest(name=s.name, sha256=s.sha256) for s in split]


def split_stages(
    state: Mapping[str, torch.Tensor], backbone: str, num_classes: int
) -> list[StageTensors]:
    """``state`` cut into its stages (in stage order, head last), each with its digest: what
    the registry stores stage by stage. ValueError as :func:`stage_digests`."""
    groups = stages(structure(backbone, num_classes=num_classes), backbone)
    owned: dict[str, list[str]] = {name: [] for name in state}
    for stage in groups:
        for name in state:
            if stage.owns(name):
                owned[name].append(stage.name)
    wrong = {n: s for n, s in owned.items() if len(s) != 1}
    if wrong:
        sample = dict(list(wrong.items())[:3])
        raise ValueError(f"tensors not in exactly one stage of {backbone}: {sample}")
    out = []
    for stage in groups:
        tensors = {n: t for n, t in state.items() if owned[n] == [stage.name]}
        h = hashlib.sha256()
        update_with_tensors(h, tensors.items())
        out.append(StageTensors(stage.name, h.hexdigest(), tensors))
    return out


def prefix_digests(digests: list[StageDigest]) -> list[str]:
    """The identity of the first k stages, for k = 1..n: each chains the one before with the
    next stage's name and digest."""
    out, previous = [], ""
    for d in digests:
        previous = hashlib.sha256(f"{previous}/{d.name}:{d.sha256}".encode()).hexdigest()
        out.append(previous)
    return out
