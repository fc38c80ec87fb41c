"""Serving core without Ray: request images, verified model loading, numeric modes, swaps."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import png_bytes, publish_tiny_model
from service.request_errors import InvalidImageError, TooLargeError, UnsupportedImageError
from service.runtime import served_model as model_module
from service.runtime.hotload import ModelSlot
from service.runtime.images import decode_request_images
from service.runtime.model_host import ModelHost, model_input
from service.runtime.served_model import load_served_model
from service.settings import NumericMode, ServeSettings
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.stage_digests import stage_digests
from training.storage.errors import IntegrityError
from training.storage.registry import CALIBRATION_FILE, Registry
from training.storage.s3 import ObjectStore

PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _publish(store: ObjectStore) -> tuple[Registry, str, torch.nn.Module]:
    reg = Registry(store)
    manifest, net = publish_tiny_model(reg, "svc", promote=False, preprocessing=PRE)
    assert CALIBRATION_FILE in manifest.files
    return reg, manifest.version, net


def test_fp32_model_matches_direct_forward(store: ObjectStore) -> None:
    reg, version, net = _publish(store)
    served = load_served_model(reg, "svc", version)
    images = decode_request_images(
        [png_bytes(1), png_bytes(2)], max_image_bytes=10**6, max_pixels=10**6, preprocessing=PRE
    )
    with torch.no_grad():
        expected = net(normalize(PRE, images))
    assert torch.allclose(served.logits(images), expected, atol=1e-5)
    top = served.top_k(images, k=2)
    assert len(top) == 2
    assert [len(t) for t in top] == [2, 2]
    assert top[0][0]["label"] in {"a", "b", "c"}
    assert served.top_k(images, k=10)[0][-1]["score"] >= 0


def test_lane_batches_normalise_crops_once_and_keep_float_inputs(store: ObjectStore) -> None:
    """Requests travel the lane as uint8 crops (a single image as a view, no copy); the merged
    batch is normalised once, off the event loop, and a protocol client's preprocessed float
    tensor in the same batch is taken as it is: every row as if sent alone."""
    reg, version, _ = _publish(store)
    served = load_served_model(reg, "svc", version)
    one = decode_request_images(
        [png_bytes(1)], max_image_bytes=10**6, max_pixels=10**6, preprocessing=PRE
    )
    two = decode_request_images(
        [png_bytes(2), png_bytes(3)], max_image_bytes=10**6, max_pixels=10**6, preprocessing=PRE
    )
    assert one.dtype == two.dtype == torch.uint8
    floats = normalize(PRE, two)
    merged = model_input(served, [one, two])
    assert merged.dtype == torch.float32
    assert torch.equal(merged, normalize(PRE, torch.cat([one, two])))
    mixed = model_input(served, [one, floats])
    assert torch.equal(mixed[:1], normalize(PRE, one))
    assert torch.equal(mixed[1:], floats)  # not normalised twice
    assert torch.equal(model_input(served, [floats]), floats)
    kept = floats.clone()
    normalize(PRE, floats)  # in place on its own copy, never on the caller's tensor
    assert torch.equal(floats, kept)
    assert torch.equal(served.logits_normalized(mixed), served.logits(torch.cat([one, two])))


def test_a_version_without_stage_digests_gets_them_at_load(store: ObjectStore) -> None:
    """Published without them (``publish_tiny_model`` calls the registry directly, as
    versions before them did): the replica computes them from the weights it loaded."""
    reg, version, net = _publish(store)
    manifest, _ = reg.load("svc", version)
    assert manifest.stages == []
    served = load_served_model(reg, "svc", version)
    assert served.manifest.stages == stage_digests(net.state_dict(), "resnet18", 3)


def test_bf16_mode_is_checked_and_falls_back(store: ObjectStore) -> None:
    reg, version, _ = _publish(store)
    bf16 = load_served_model(reg, "svc", version, mode="bf16", min_agreement=0.0, check_speed=False)
    assert bf16.mode == "bf16"
    assert 0.0 <= bf16.agreement <= 1.0
    assert bf16.fallback is None
    strict = load_served_model(reg, "svc", version, mode="bf16", min_agreement=1.01)
    assert strict.mode == "fp32"  # agreement can never reach 101 %: falls back
    assert strict.fallback is not None
    assert "agreement" in strict.fallback
    # the fallback really is fp32: contiguous weights, same logits as a fresh fp32 load
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    fp32 = load_served_model(reg, "svc", version)
    assert torch.equal(strict.logits(x), fp32.logits(x))


@pytest.mark.parametrize("mode", ["channels_last", "fp32_jit", "bf16", "bf16_jit"])
def test_every_mode_serves_what_fp32_serves(store: ObjectStore, mode: NumericMode) -> None:
    reg, version, _ = _publish(store)
    fp32 = load_served_model(reg, "svc", version)
    exact = mode.startswith("fp32") or mode == "channels_last"
    # bf16 on random weights: near-tied logits may flip a top-1 (seen on a CPU with native
    # bf16), so its agreement gate is off here; the logits are compared below instead
    served = load_served_model(
        reg, "svc", version, mode=mode, check_speed=False, min_agreement=0.99 if exact else 0.0
    )
    assert served.mode == mode, served.fallback
    if exact:
        assert served.agreement == 1.0
    # the traced modes: the trunk traced (one trace per trunk content), the head eager
    traced = getattr(getattr(served.module, "body", None), "runnable", served.module)
    assert isinstance(traced, torch.jit.ScriptModule) == mode.endswith("_jit")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    tol = 1e-4 if exact else 0.1
    # any batch size, not only the traced one
    for n in (1, 5):
        assert torch.allclose(served.logits(x[:n]), fp32.logits(x[:n]), atol=tol)


def test_a_mode_slower_than_fp32_is_refused_once_per_architecture(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, version, _ = _publish(store)
    timed: list[str] = []

    def fake_seconds(module: object, x: torch.Tensor, mode: str) -> float:
        timed.append(mode)
        return {"fp32": 1.0, "bf16": 2.0, "fp32_jit": 0.5}[mode]

    monkeypatch.setattr(model_module, "_SECONDS", {})
    monkeypatch.setattr(model_module, "_seconds_per_forward", fake_seconds)
    slow = load_served_model(reg, "svc", version, mode="bf16", min_agreement=0.0)
    assert slow.mode == "fp32"
    assert slow.fallback is not None
    assert "slower than fp32" in slow.fallback
    fast = load_served_model(reg, "svc", version, mode="fp32_jit", min_agreement=0.0)
    assert fast.mode == "fp32_jit"
    assert fast.fallback is None
    assert timed == ["fp32", "bf16", "fp32_jit"]  # fp32 timed once for both
    # the next version of the same architecture reuses the verdicts: no timing on hot-loads
    again = load_served_model(reg, "svc", version, mode="bf16", min_agreement=0.0)
    assert again.mode == "fp32"
    assert again.fallback == slow.fallback
    load_served_model(reg, "svc", version, mode="fp32_jit", min_agreement=0.0)
    assert len(timed) == 3


def test_tampered_calibration_refused(store: ObjectStore) -> None:
    reg, version, _ = _publish(store)
    key = f"models/svc/versions/{version}/{CALIBRATION_FILE}"
    blob = bytearray(store.get_bytes(key))
    blob[-1] ^= 0xFF
    store.put_bytes(key, bytes(blob))
    with pytest.raises(IntegrityError):
        load_served_model(reg, "svc", version)


def test_slot_swaps_whole_models(store: ObjectStore) -> None:
    reg, version, _ = _publish(store)
    slot = ModelSlot()
    assert slot.current is None
    first = load_served_model(reg, "svc", version)
    assert slot.swap(first) is None
    in_flight = slot.current  # a batch holds this reference until it finishes
    second = load_served_model(reg, "svc", version)
    assert slot.swap(second) is first
    assert in_flight is first
    assert slot.current is second
    assert slot.swaps == 2


def _encoded(fmt: str, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("bad", "error", "status"),
    [
        (b"x" * 5000, TooLargeError, 413),
        (_encoded("GIF", 8), UnsupportedImageError, 415),
        (png_bytes(1)[:70], InvalidImageError, 422),
        (_encoded("PNG", 4000), TooLargeError, 413),  # small file, 16 Mpx: a bomb
    ],
)
def test_request_image_errors_name_the_item(bad: bytes, error: type, status: int) -> None:
    with pytest.raises(error) as err:
        decode_request_images(
            [png_bytes(0), bad], max_image_bytes=4000, max_pixels=100 * 100, preprocessing=PRE
        )
    assert err.value.field == "images[1]"
    assert err.value.status == status
    assert err.value.to_dict()["error"]["field"] == "images[1]"


@pytest.mark.parametrize("backbone", ["resnet18", "regnet_x_400mf"])
def test_check_loadable_accepts_the_architecture_and_names_a_mismatch(backbone: str) -> None:
    from service.runtime.served_model import check_loadable
    from training.backbones import build_backbone
    from training.storage.registry import Manifest

    manifest = Manifest(
        model="m",
        version="v1",
        backbone=backbone,
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=PRE,
        created_at="2026-01-01T00:00:00+00:00",
        files={},
    )
    state = build_backbone(backbone, num_classes=3).state_dict()
    check_loadable(manifest, state)  # regnet cannot be built on the meta device: no matter
    wrong = {**state, next(iter(state)): torch.zeros(1)}
    with pytest.raises(IntegrityError, match="needs"):
        check_loadable(manifest, wrong)


def test_variants_hold_the_stages_they_share_once(store: ObjectStore) -> None:
    """Fine-tunes of one backbone served in fp32 hold their common leading stages once (the
    submodules of the version loaded first), answer exactly as each alone, and keep them when
    that version goes; a stage that differs stays their own."""
    import gc

    from training.backbones import build_backbone, build_with_weights
    from training.stage_digests import split_stages

    torch.manual_seed(3)
    base = build_backbone("resnet18", num_classes=3).eval().state_dict()
    heads = dict(base, **{"fc.weight": base["fc.weight"] + 0.5})
    layer4 = dict(base, **{"layer4.1.conv2.weight": base["layer4.1.conv2.weight"] * 0.9})
    reg = Registry(store)
    fields = {"backbone": "resnet18", "num_classes": 3, "class_names": ["a", "b", "c"]}
    versions = {}
    for name, state in (("base", base), ("heads", heads), ("layer4", layer4)):
        manifest = reg.publish(
            split_stages(state, "resnet18", 3), model=name, preprocessing=PRE, **fields
        )
        versions[name] = manifest.version
    served = {n: load_served_model(reg, n, v) for n, v in versions.items()}
    a, h, l4 = served["base"].module, served["heads"].module, served["layer4"].module
    for part in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        assert getattr(h, part) is getattr(a, part)
    assert h.fc is not a.fc
    assert l4.layer3 is a.layer3
    assert l4.layer4 is not a.layer4
    assert l4.fc is not a.fc
    trunk_stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert served["base"].sharing.stages == []
    assert served["heads"].sharing.stages == trunk_stages
    assert served["layer4"].sharing.stages == trunk_stages[:-1]
    heads_sharing = served["heads"].sharing
    fc_bytes = (3 * 512 + 3) * 4
    assert heads_sharing.model_bytes - heads_sharing.shared_bytes == fc_bytes
    x = normalize(PRE, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        for name, state in (("heads", heads), ("layer4", layer4)):
            alone = build_with_weights("resnet18", dict(state), num_classes=3).eval()
            assert torch.allclose(served[name].logits_normalized(x), alone(x), atol=1e-5)
        before = served["heads"].logits_normalized(x)
        del served["base"], a
        gc.collect()
        assert torch.equal(served["heads"].logits_normalized(x), before)


def test_versions_of_one_trunk_run_it_once_per_batch(store: ObjectStore) -> None:
    """Merged requests for fine-tunes of one backbone: each stage content runs once, on the
    rows of the versions that hold it (the stages up to layer3 once for all three, the base's
    layer4 once for the two that differ only in the head, the changed layer4 on its own
    rows), each version's head on its own rows, every answer as the version alone gives it."""
    import asyncio

    from service.runtime.model_host import ModelHost
    from service.settings import ServeSettings
    from training.backbones import build_backbone
    from training.stage_digests import split_stages

    torch.manual_seed(4)
    base = build_backbone("resnet18", num_classes=3).eval().state_dict()
    states = {
        "one": base,
        "two": dict(base, **{"fc.weight": base["fc.weight"].flip(0)}),
        "own": dict(base, **{"layer4.0.bn1.bias": base["layer4.0.bn1.bias"] + 0.1}),
    }
    reg = Registry(store)
    fields = {"backbone": "resnet18", "num_classes": 3, "class_names": ["a", "b", "c"]}
    for name, state in states.items():
        m = reg.publish(split_stages(state, "resnet18", 3), model=name, preprocessing=PRE, **fields)
        reg.set_alias(name, "production", m.version)
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), Registry(store))
    crops = decode_request_images(
        [png_bytes(i, seed=i) for i in range(3)],
        max_image_bytes=10**6,
        max_pixels=10**6,
        preprocessing=PRE,
    )

    calls: dict[str, list[int]] = {}

    def count(name: str, module: torch.nn.Module) -> None:
        module.register_forward_hook(
            lambda _m, args, _out: calls.setdefault(name, []).append(args[0].shape[0])
        )

    async def ask() -> tuple[list, dict]:
        served = {n: (await host.follower(n)).current for n in states}
        count("layer3", served["one"].module.layer3)
        count("layer4", served["one"].module.layer4)
        count("own layer4", served["own"].module.layer4)
        items = [(served[n], crops[i : i + 1], 3) for i, n in enumerate(states)]
        items.append((served["two"], crops[:2], 3))
        return await host.lane.submit(items), served

    answers, served = asyncio.run(ask())
    for follower in list(host.followers.values()):
        follower.stop()
    assert host.stats()["shared_trunk_passes"] == 1  # one pass over the three versions
    assert served["one"].split.key == served["two"].split.key != served["own"].split.key
    assert served["own"].module.layer3 is served["one"].module.layer3
    # the rows: one's image 0, own's image 2, two's images 1 and 0+1: the input of each
    # request once (5 rows); layer4 of one and two over their 4, own's over its 1
    assert calls == {"layer3": [5], "layer4": [4], "own layer4": [1]}

    def same(answer: list, alone: list) -> None:
        for got, want in zip(answer, alone, strict=True):
            assert [r["label"] for r in got] == [r["label"] for r in want]
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)

    for i, name in enumerate(states):
        same(answers[i], served[name].top_k(crops[i : i + 1], 3))
    same(answers[3], served["two"].top_k(crops[:2], 3))
    # the same trunk, each version's own head (their answers to the same images differ)
    assert served["one"].top_k(crops[:2], 3) != answers[3]


@pytest.mark.parametrize("with_batch", [True, False], ids=["decode-with-batch", "decode-apart"])
def test_a_refused_image_fails_its_own_request_only(store: ObjectStore, with_batch: bool) -> None:
    """Requests merged into one forward pass, one of them with an image that is no image and
    one with an image over the pixel cap: those two get their own errors naming the item, the
    others their answers, the same as each alone - whether images are decoded with the batch
    (the default) or apart, per request."""
    reg = Registry(store)
    publish_tiny_model(reg, "mixed", preprocessing=PRE)
    settings = ServeSettings(
        poll_interval_s=60, numeric_mode="fp32", decode_with_batch=with_batch, max_image_pixels=4096
    )
    host = ModelHost(settings, reg)
    good = [png_bytes(i) for i in range(3)]

    async def run() -> list[Any]:
        follower = await host.follower("mixed")
        alone = [await host.predict(follower, [g], 2) for g in good]
        merged = await asyncio.gather(
            host.predict(follower, [good[0]], 2),
            host.predict(follower, [good[1], b"not an image"], 2),
            host.predict(follower, [png_bytes(1, size=128)], 2),  # 16384 pixels > 4096
            host.predict(follower, [good[2], good[0]], 2),
            return_exceptions=True,
        )
        return [alone, merged]

    try:
        alone, merged = asyncio.run(run())
    finally:
        for follower in list(host.followers.values()):
            follower.stop()
    sizes = host.stats()["batch_sizes"]
    if with_batch:  # the four went through one pass
        assert sizes == {1: 3, 4: 1}
    else:  # the refused two never queued; the others as their decodes finished
        assert sum(n * times for n, times in sizes.items()) == 5
    first, refused, too_large, last = merged
    assert isinstance(refused, InvalidImageError)
    assert refused.field == "images[1]"
    assert isinstance(too_large, TooLargeError)
    assert too_large.field == "images[0]"

    # the same labels; scores to rounding (a batch of another size sums in another order)
    def same(got: list[Any], want: list[Any]) -> None:
        assert [[p["label"] for p in r] for r in got] == [[p["label"] for p in r] for r in want]
        scores = [pytest.approx([p["score"] for p in r], abs=1e-4) for r in want]
        assert [[p["score"] for p in r] for r in got] == scores

    same(first["predictions"], alone[0]["predictions"])
    same(last["predictions"], alone[2]["predictions"] + alone[0]["predictions"])


def test_a_failing_decode_fails_its_own_request_only(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in decoding that is no refusal (a fault of ours, not the client's) fails the
    request whose images raised it, never the rest of the batch it was decoded with."""
    from service.runtime import model_host

    real = model_host.decode_request_images

    def faulty(images: list[bytes], **kwargs: Any) -> torch.Tensor:
        if images == [b"fault"]:
            raise RuntimeError("a fault of ours")
        return real(images, **kwargs)

    monkeypatch.setattr(model_host, "decode_request_images", faulty)
    reg = Registry(store)
    publish_tiny_model(reg, "faulty", preprocessing=PRE)
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), reg)

    async def run() -> list[Any]:
        follower = await host.follower("faulty")
        return await asyncio.gather(
            host.predict(follower, [png_bytes(0)], 2),
            host.predict(follower, [b"fault"], 2),
            host.predict(follower, [png_bytes(1)], 2),
            return_exceptions=True,
        )

    try:
        first, fault, last = asyncio.run(run())
    finally:
        for follower in list(host.followers.values()):
            follower.stop()
    assert host.stats()["batch_sizes"] == {3: 1}
    assert isinstance(fault, RuntimeError)
    assert len(first["predictions"]) == len(last["predictions"]) == 1
