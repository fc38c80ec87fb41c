"""Freeze policies: exact trainable sets per family, phases, BN statistics, real runs."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from training.backbones import build_backbone
from training.freeze import (
    apply_freeze,
    param_groups,
    plan_freeze,
    set_frozen_batchnorm,
)
from training.freeze_spec import (
    LPFT,
    Full,
    GradualUnfreeze,
    HeadOnly,
    LastNStages,
    LayerDecay,
    Patterns,
)
from training.loop import Precision, build_optimizer, build_scheduler, train_one_epoch
from training.storage.errors import SpecError

# family -> (head prefix, prefixes of the last two stages below the head)
FAMILIES = {
    "resnet18": ("fc", ["layer3", "layer4"]),
    "mobilenet_v3_small": (
        "classifier",
        [
            "features.4",
            "features.5",
            "features.6",
            "features.7",
            "features.8",
            "features.9",
            "features.10",
            "features.11",
            "features.12",
        ],
    ),
    "efficientnet_b0": (
        "classifier",
        ["features.4", "features.5", "features.6", "features.7", "features.8"],
    ),
    "convnext_tiny": ("classifier", ["features.4", "features.5", "features.6", "features.7"]),
}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_exact_trainable_sets(backbone: str) -> None:
    head, last2 = FAMILIES[backbone]
    model = build_backbone(backbone, num_classes=3)
    names = {n for n, _ in model.named_parameters()}
    expected = [
        (Full(), names),
        (HeadOnly(), {n for n in names if _under(n, [head])}),
        (LastNStages(n=2), {n for n in names if _under(n, [head, *last2])}),
        (LPFT(probe_epochs=1), names),  # phased: DDP knows everything from the start
        (GradualUnfreeze(every=1), names),
        (LayerDecay(decay=0.5), names),
        (Patterns(trainable=[r"\.bias$"]), {n for n in names if n.endswith(".bias")}),
    ]
    for policy, want in expected:
        m = build_backbone(backbone, num_classes=3)
        apply_freeze(m, plan_freeze(policy, m, backbone))
        assert _trainable(m) == want, (backbone, policy.policy)


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_phases_and_factors(backbone: str) -> None:
    model = build_backbone(backbone, num_classes=3)
    head = len(plan_freeze(Full(), model, backbone).stages) - 1
    lpft = plan_freeze(LPFT(probe_epochs=2, ft_lr_factor=0.1), model, backbone)
    assert [lpft.stage_factor(head, e) for e in range(3)] == [1.0, 1.0, 0.1]
    assert [lpft.stage_factor(0, e) for e in range(3)] == [0.0, 0.0, 0.1]
    gu = plan_freeze(GradualUnfreeze(every=2), model, backbone)
    active = [sum(gu.stage_factor(i, e) > 0 for i in range(head + 1)) for e in range(6)]
    assert active == [1, 1, 2, 2, 3, 3]
    ld = plan_freeze(LayerDecay(decay=0.5), model, backbone)
    assert ld.stage_factor(head, 0) == 1.0
    assert ld.stage_factor(head - 2, 0) == 0.25


def test_policy_errors_name_the_field() -> None:
    model = build_backbone("resnet18", num_classes=3)
    with pytest.raises(SpecError) as err:
        plan_freeze(LastNStages(n=9), model, "resnet18")
    assert err.value.field == "freeze.n"
    with pytest.raises(SpecError) as err:
        plan_freeze(Patterns(trainable=["^nothing$"]), model, "resnet18")
    assert err.value.field == "freeze.trainable"


def test_frozen_batchnorm_survives_train() -> None:
    model = build_backbone("resnet18", num_classes=3)
    plan = plan_freeze(LastNStages(n=1), model, "resnet18")
    apply_freeze(model, plan)
    model.train()
    assert not model.bn1.training
    assert not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training
    # a phased policy: frozen in epoch 0, trains in epoch 1
    model = build_backbone("resnet18", num_classes=3)
    plan = plan_freeze(LPFT(probe_epochs=1), model, "resnet18")
    apply_freeze(model, plan)
    model.train()
    assert not model.layer1[0].bn1.training
    set_frozen_batchnorm(model, plan, epoch=1)
    model.train()
    assert model.layer1[0].bn1.training


def _short_run(model: nn.Module, plan, epochs: int) -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    opt = build_optimizer(param_groups(model, plan, weight_decay=0.05), name="adamw", lr=0.01)
    sched = build_scheduler(opt, plan, steps_per_epoch=len(batches), epochs=epochs)
    for epoch in range(epochs):
        set_frozen_batchnorm(model, plan, epoch)
        train_one_epoch(
            model,
            batches,
            opt,
            sched,
            plan=plan,
            epoch=epoch,
            precision=Precision(torch.device("cpu")),
        )


@pytest.mark.parametrize(
    ("backbone", "policy", "frozen_prefix"),
    [
        ("resnet18", LastNStages(n=1), r"^(conv1|bn1|layer[123])\."),
        ("mobilenet_v3_small", HeadOnly(feature_cache=False), r"^features\."),
        (
            "efficientnet_b0",
            Patterns(trainable=[r"^features\.8\.", r"^classifier\."]),
            r"^features\.[0-7]\.",
        ),
    ],
)
def test_real_run_frozen_bytes_identical(backbone: str, policy, frozen_prefix: str) -> None:
    model = build_backbone(backbone, num_classes=3)
    plan = plan_freeze(policy, model, backbone)
    apply_freeze(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _short_run(model, plan, epochs=1)
    after = model.state_dict()
    frozen = [k for k in before if re.search(frozen_prefix, k)]
    assert frozen
    assert any("running_mean" in k for k in frozen)
    for k in frozen:  # weights AND BatchNorm buffers
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in plan.trainable if not torch.equal(before[k], after[k])]
    assert len(changed) == len(plan.trainable)


def test_lp_ft_backbone_waits_for_phase_two() -> None:
    model = build_backbone("resnet18", num_classes=3)
    plan = plan_freeze(LPFT(probe_epochs=1, ft_lr_factor=0.5), model, "resnet18")
    apply_freeze(model, plan)
    w0 = model.layer1[0].conv1.weight.detach().clone()
    bn0 = model.layer1[0].bn1.running_mean.clone()
    _short_run(model, plan, epochs=1)
    assert torch.equal(w0, model.layer1[0].conv1.weight)
    assert torch.equal(bn0, model.layer1[0].bn1.running_mean)
    model2 = build_backbone("resnet18", num_classes=3)
    apply_freeze(model2, plan)
    w1 = model2.layer1[0].conv1.weight.detach().clone()
    _short_run(model2, plan, epochs=2)
    assert not torch.equal(w1, model2.layer1[0].conv1.weight)


def test_frozen_batchnorm_pickles_and_shows_in_repr() -> None:
    import pickle

    from training.freeze import StatsFrozenBatchNorm2d

    model = build_backbone("resnet18", num_classes=3)
    apply_freeze(model, plan_freeze(HeadOnly(), model, "resnet18"))
    assert isinstance(model.bn1, StatsFrozenBatchNorm2d)
    assert "stats=frozen" in repr(model.bn1)
    copy = pickle.loads(pickle.dumps(model))  # what Ray does to ship a model
    copy.train()
    assert not copy.bn1.training
    assert type(copy.bn1) is StatsFrozenBatchNorm2d
    assert list(copy.state_dict()) == list(model.state_dict())
    before = copy.bn1.running_mean.clone()
    copy(torch.randn(2, 3, 32, 32))
    assert torch.equal(copy.bn1.running_mean, before)
    # a phase that unfreezes a stage gives the plain class back, and it trains again
    plan = plan_freeze(Full(), copy, "resnet18")
    set_frozen_batchnorm(copy, plan, epoch=0)
    copy.train()
    assert type(copy.bn1) is torch.nn.BatchNorm2d
    assert copy.bn1.training
