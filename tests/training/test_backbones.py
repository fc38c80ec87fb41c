"""Backbones by name, their stages, the head split; the torchvision import shim."""

from __future__ import annotations

import pytest
import torch

from training import tv
from training.backbones import BACKBONES, build_backbone, head_module, stages, trunk
from training.storage.errors import SpecError

REQUIRED = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
    "vit_b_16",
]


def test_torchvision_imports_through_shim() -> None:
    assert tv.torchvision.__version__.startswith("0.28")
    assert "resnet18" in tv.models.list_models()


@pytest.mark.parametrize("name", REQUIRED)
def test_every_tensor_in_exactly_one_stage(name: str) -> None:
    model = build_backbone(name, num_classes=7)
    st = stages(model, name)
    assert st[-1].name == "head"
    assert len(st) >= 5
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for n in names:
        assert sum(s.owns(n) for s in st) == 1, n


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_trunk_then_head_is_the_model(name: str) -> None:
    model = build_backbone(name, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = trunk(model, name)(x)
        assert torch.allclose(head_module(model, name)(feats), model(x), atol=1e-5)
    assert not isinstance(getattr(model, "fc", None) or model, torch.nn.Identity)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(SpecError) as err:
        build_backbone("resnet9000", num_classes=3)
    assert err.value.field == "base.backbone"
    for name in REQUIRED:
        assert name in err.value.message
    assert set(REQUIRED) <= set(BACKBONES)
