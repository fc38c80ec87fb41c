"""Backbones by name, their stages, the head split; the torchvision import shim."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL_PRE
from training import tv
from training.backbones import (
    BACKBONES,
    build_backbone,
    build_with_weights,
    head_module,
    stage_runs,
    stages,
    structure,
    trunk,
)
from training.job_settings import TrainingSettings
from training.run_context import RunInputs
from training.spec import parse_spec
from training.storage.errors import SpecError
from training.storage.location import S3Settings
from training.worker import build_model

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


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]
)
def test_stage_runs_chain_to_the_model_each_holding_its_stage(name: str) -> None:
    model = build_backbone(name, num_classes=4).eval()
    runs = stage_runs(model, name)
    assert runs is not None
    body = stages(model, name)[:-1]
    assert len(runs) == len(body)
    named = dict(model.named_parameters())
    for run, stage in zip(runs, body, strict=True):
        own = {id(p) for p in run.parameters()}
        assert own == {id(p) for n, p in named.items() if stage.owns(n)}, stage.name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for run in runs:
            h = run(h)
        assert torch.allclose(head_module(model, name)(h), model(x), atol=1e-5)
    assert stage_runs(build_backbone("vit_b_16", num_classes=4), "vit_b_16") is None


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(SpecError) as err:
        build_backbone("resnet9000", num_classes=3)
    assert err.value.field == "base.backbone"
    for name in REQUIRED:
        assert name in err.value.message
    assert set(REQUIRED) <= set(BACKBONES)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "regnet_x_400mf"])
def test_a_model_built_with_weights_holds_them_without_a_random_init(name: str) -> None:
    """Built on the meta device and filled by assignment (RegNet's builder computes with
    tensors: built on the CPU, then loaded): the same forward as a loaded model."""
    source = build_backbone(name, num_classes=4).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    built = build_with_weights(name, state, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(built(x), source(x), atol=1e-6)
    assert not any(t.is_meta for t in built.state_dict().values())
    if name != "regnet_x_400mf":  # assigned: the model holds the given tensors
        first = next(iter(state))
        assert built.state_dict()[first].data_ptr() == state[first].data_ptr()
    with pytest.raises(RuntimeError):
        build_with_weights(name, {**state, "extra.weight": torch.zeros(1)}, num_classes=4)
    assert all(t.is_meta for t in structure("resnet18", num_classes=4).parameters())


def test_a_retrain_with_the_same_classes_starts_from_copies_of_the_base() -> None:
    """``keep_head``: every tensor of the model is the base's value, in its own storage
    (training changes the model, never the base it came from; the serving version's score
    reuses the base's tensors)."""
    base = build_backbone("resnet18", num_classes=3).state_dict()
    spec = parse_spec(
        {
            "model": "m",
            "base": {"backbone": "resnet18"},
            "dataset": "s3://b/datasets/d/",
            "freeze": {"policy": "last_n_stages", "n": 1},
            "preprocess": SMALL_PRE.model_dump(),
        }
    )
    for keep_head in (True, False):
        inputs = RunInputs(
            spec=spec,
            s3=S3Settings(bucket="b"),
            training=TrainingSettings(),
            backbone="resnet18",
            classes=["a", "b", "c"],
            train=[],
            val=[],
            preprocessing=SMALL_PRE,
            base_state=base,
            keep_head=keep_head,
        )
        model, _ = build_model(inputs)
        own = model.state_dict()
        for k, v in base.items():
            if keep_head or not k.startswith("fc."):
                assert torch.equal(own[k], v), k
                assert own[k].data_ptr() != v.data_ptr(), k
        assert any(p.requires_grad for p in model.parameters())
        assert not all(p.requires_grad for p in model.parameters())  # the freeze applied
