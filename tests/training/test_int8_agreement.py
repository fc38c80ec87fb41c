"""INT8 that keeps its agreement with fp32: where plain post-training quantization misses the
target on the calibration crops, accuracy control returns the layers that cost most agreement
to floating point (at most half of them) until it holds, and the graph's record names them;
where even that misses, the plain graph stays (the replicas' gate refuses it). Real OpenVINO
and NNCF, in the export child."""

from __future__ import annotations

import pytest
import torch

from conftest import png_bytes
from service.runtime.images import decode_request_images
from training.backbones import build_backbone
from training.openvino_ir import ExportChild, ExportedGraph
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing

PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _crops(n: int, offset: int = 0) -> torch.Tensor:
    raw = decode_request_images(
        [png_bytes(i % 3, seed=offset + i) for i in range(n)],
        max_image_bytes=10**6,
        max_pixels=10**6,
        preprocessing=PRE,
    )
    return normalize(PRE, raw)


def _net(head_steps: int) -> torch.nn.Module:
    """A random resnet18 whose head took ``head_steps`` steps towards telling the test's
    shapes apart: small margins, which INT8's rounding flips now and then."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", num_classes=3).eval()
    x, y = _crops(24), torch.tensor([i % 3 for i in range(24)])
    head, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = net(x)
    net.fc = head
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(head_steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    return net.eval()


def _int8(net: torch.nn.Module, min_agreement: float | None) -> ExportedGraph:
    with ExportChild() as child:
        (graph,) = child.export(
            net.state_dict(),
            backbone="resnet18",
            num_classes=3,
            calibration=_crops(48),
            held_out=_crops(16, offset=500),
            modes=("int8",),
            min_agreement=min_agreement,
        )
    return graph


def test_int8_below_its_target_gets_a_few_layers_back_in_floating_point() -> None:
    net = _net(head_steps=3)
    plain = _int8(net, None)
    assert len(plain.unquantized) == 1  # the classifier head alone
    if plain.calibration_agreement >= 0.99:  # INT8 kernels differ by CPU (measured: 0.979)
        pytest.skip(f"plain INT8 agrees {plain.calibration_agreement:.3f} on this CPU")
    kept = _int8(net, 0.99)
    assert kept.calibration_agreement >= 0.99
    assert kept.held_out_agreement is not None
    assert set(plain.unquantized) < set(kept.unquantized)  # the head, and what was restored
    assert len(kept.unquantized) <= 1 + 20 // 2
    assert kept.measured()["unquantized"] == list(kept.unquantized)


def test_int8_that_only_floating_point_would_save_stays_plain() -> None:
    """A random head: near-tied answers everywhere. Accuracy control never returns more than
    half the layers to floating point, and never replaces the plain graph with one that still
    misses the target: here (measured on an AMD EPYC) half the layers do not reach it, so the
    plain graph stays, its agreement recorded as it is."""
    net = _net(head_steps=0)
    plain = _int8(net, None)
    if plain.calibration_agreement >= 0.99:
        pytest.skip(f"plain INT8 agrees {plain.calibration_agreement:.3f} on this CPU")
    kept = _int8(net, 0.99)
    layers = 21  # resnet18's convolutions and its head
    if kept.unquantized == plain.unquantized:  # nothing better within half the layers
        assert kept.calibration_agreement == plain.calibration_agreement
    else:  # this CPU's kernels reached it within the bound
        assert kept.calibration_agreement >= 0.99
        assert len(kept.unquantized) <= 1 + (layers - 1) // 2
