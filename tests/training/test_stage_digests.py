"""Stage digests: every backbone's stages partition its tensors; a digest changes exactly
when its stage's tensors do (the ground a trunk shared by content stands on)."""

from __future__ import annotations

import pytest
import torch

from training.backbones import BACKBONES, build_backbone
from training.stage_digests import prefix_digests, split_stages, stage_digests
from training.storage.registry import StageDigest
from training.storage.stage_files import STAGE_NAME, StageTensors, stage_blob


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_the_stages_of_every_backbone_partition_its_tensors(backbone: str) -> None:
    model = build_backbone(backbone, num_classes=3)
    state = {n: torch.zeros(1) for n in model.state_dict()}  # names are what is checked
    digests = stage_digests(state, backbone, 3)
    assert digests[0].name == "stem"
    assert digests[-1].name == "head"
    assert len({d.name for d in digests}) == len(digests)
    assert all(STAGE_NAME.fullmatch(d.name) for d in digests)  # each names a stored file
    split = split_stages(state, backbone, 3)
    assert [(s.name, s.sha256) for s in split] == [(d.name, d.sha256) for d in digests]
    assert sorted(n for s in split for n in s.tensors) == sorted(state)


def _changed(a: list[StageDigest], b: list[StageDigest]) -> list[str]:
    return [x.name for x, y in zip(a, b, strict=True) if x != y]


def test_a_digest_moves_with_its_stage_only() -> None:
    torch.manual_seed(0)
    state = build_backbone("resnet18", num_classes=4).state_dict()
    before = stage_digests(state, "resnet18", 4)
    assert [d.name for d in before] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert stage_digests({k: v.clone() for k, v in state.items()}, "resnet18", 4) == before

    head_only = dict(state, **{"fc.weight": state["fc.weight"] + 1})
    changed = [
        a.name
        for a, b in zip(before, stage_digests(head_only, "resnet18", 4), strict=True)
        if a != b
    ]
    assert changed == ["head"]
    # a BatchNorm buffer is content too
    buffer = dict(state, **{"layer1.0.bn1.running_mean": state["layer1.0.bn1.running_mean"] + 1})
    changed = [
        a.name for a, b in zip(before, stage_digests(buffer, "resnet18", 4), strict=True) if a != b
    ]
    assert changed == ["layer1"]
    # the same bytes in another dtype are other content
    as_bf16 = dict(state, **{"conv1.weight": state["conv1.weight"].to(torch.bfloat16)})
    assert stage_digests(as_bf16, "resnet18", 4)[0] != before[0]


def test_prefix_digests_name_the_leading_stages_together() -> None:
    state = build_backbone("resnet18", num_classes=4).state_dict()
    a = stage_digests(state, "resnet18", 4)
    b = stage_digests(dict(state, **{"fc.bias": state["fc.bias"] + 1}), "resnet18", 4)
    pa, pb = prefix_digests(a), prefix_digests(b)
    assert pa[:-1] == pb[:-1]  # the trunk (every stage but the head) is shared
    assert pa[-1] != pb[-1]
    assert len(set(pa)) == len(pa)


def test_a_tensor_outside_every_stage_is_refused() -> None:
    state = dict(build_backbone("resnet18", num_classes=4).state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="exactly one stage"):
        stage_digests(state, "resnet18", 4)


def test_a_stage_file_is_the_same_bytes_in_every_version() -> None:
    """Nothing of the version goes into a stage's file: equal content, equal bytes."""
    state = build_backbone("resnet18", num_classes=4).state_dict()
    a = split_stages(state, "resnet18", 4)[2]
    b = split_stages({k: v.clone() for k, v in state.items()}, "resnet18", 4)[2]
    assert stage_blob(a) == stage_blob(b)
    assert len({stage_blob(a) for _ in range(8)}) == 1  # no order that varies between calls
    other = StageTensors(a.name, a.sha256, {k: v + 1 for k, v in a.tensors.items()})
    assert stage_blob(other) != stage_blob(a)
