"""A replica's models within a byte budget (no Ray): variants of one backbone cost their own
stages only; past the budget the least recently used are parked and load again from memory
(the stage cache: no store read); a stage altered by one byte is not shared; hot-loading one
variant leaves the others' answers as they were."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import png_bytes
from service.runtime.images import decode_request_images
from service.runtime.model_host import ModelHost
from service.settings import ServeSettings
from training.backbones import build_backbone, build_with_weights
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.stage_digests import split_stages
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore
from training.storage.stage_files import StageCache

PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
FIELDS = {"backbone": "resnet18", "num_classes": 3, "class_names": ["a", "b", "c"]}
MB = 2**20


def _one_byte_changed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the lowest bit of its first byte flipped."""
    out = t.clone()
    out.view(torch.uint8).view(-1)[0] ^= 1
    return out


def _variants(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    base = build_backbone("resnet18", num_classes=3).eval().state_dict()
    w = base["layer1.0.conv1.weight"]
    return {
        "base": base,
        "heads1": dict(base, **{"fc.weight": base["fc.weight"] + 0.5}),
        "heads2": dict(base, **{"fc.bias": base["fc.bias"] - 0.5}),
        "own4": dict(base, **{"layer4.1.conv2.weight": base["layer4.1.conv2.weight"] * 0.9}),
        "byte": dict(base, **{"layer1.0.conv1.weight": _one_byte_changed(w)}),
    }


def _publish(reg: Registry, states: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, state in states.items():
        m = reg.publish(split_stages(state, "resnet18", 3), model=name, preprocessing=PRE, **FIELDS)
        reg.set_alias(name, "production", m.version)


def _crops() -> torch.Tensor:
    images = [png_bytes(i, seed=i) for i in range(2)]
    return decode_request_images(images, max_image_bytes=10**6, max_pixels=10**6, preprocessing=PRE)


def _alone(state: dict[str, torch.Tensor], crops: torch.Tensor) -> list[float]:
    with torch.inference_mode():
        net = build_with_weights("resnet18", dict(state), num_classes=3).eval()
        return torch.softmax(net(normalize(PRE, crops)), dim=1).flatten().tolist()


def _scores(answer: dict) -> list[float]:
    """Image by image, the scores of classes a, b, c."""
    return [
        next(p["score"] for p in image if p["label"] == c)
        for image in answer["predictions"]
        for c in "abc"
    ]


def test_parks_least_recently_used_models_past_the_byte_budget(store: ObjectStore) -> None:
    states = _variants(11)
    _publish(Registry(store), states)
    # one resnet18 (45 MB) and its heads fit; a second layer4 (+33 MB) does not
    settings = ServeSettings(poll_interval_s=60, numeric_mode="fp32", model_cache_mb=60)
    reg = Registry(store, cache=StageCache(256 * MB))
    host = ModelHost(settings, reg)
    crops = _crops()
    pngs = [png_bytes(i, seed=i) for i in range(2)]

    async def run() -> None:
        for name in ("base", "heads1", "heads2"):
            answer = await host.predict(await host.follower(name), pngs, 3)
            assert _scores(answer) == pytest.approx(_alone(states[name], crops), abs=1e-5)
        stats = host.stats()
        assert stats["model_cache"]["parks"] == 0
        one = sum(t.numel() * t.element_size() for t in states["base"].values())
        head = (3 * 512 + 3) * 4
        assert stats["model_cache"]["bytes"] == one + 2 * head  # one trunk, three heads
        assert stats["model_bytes"]["separate"] == 3 * one

        # own4: the trunk but layer4 shared; together over budget: least recently used go
        await host.predict(await host.follower("own4"), pngs, 3)
        assert [f.name for f in host.cache.loaded()] == ["own4"]
        assert host.cache.parks == 3
        assert host.followers["base"].current is None
        assert host.followers["base"].parked
        assert host.stats()["model_cache"]["bytes"] <= 60 * MB
        assert "base" not in {n for n, m in host.models().items() if m["version"]}

        # a parked model answers again: loaded again from memory (no store read), and it
        # parks own4 to fit
        reads, loads = reg.cache.misses, host.stats()["model_loads"]
        answer = await host.predict(await host.follower("heads1"), pngs, 3)
        assert _scores(answer) == pytest.approx(_alone(states["heads1"], crops), abs=1e-5)
        assert reg.cache.misses == reads
        assert host.stats()["model_loads"] == loads + 1
        assert [f.name for f in host.cache.loaded()] == ["heads1"]

    asyncio.run(run())
    for follower in list(host.followers.values()):
        follower.stop()


def test_a_stage_changed_by_one_byte_is_not_shared(store: ObjectStore) -> None:
    states = _variants(12)
    _publish(Registry(store), {n: states[n] for n in ("base", "byte")})
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), Registry(store))
    pngs, crops = [png_bytes(i, seed=i) for i in range(2)], _crops()

    async def run() -> None:
        await host.follower("base")
        answer = await host.predict(await host.follower("byte"), pngs, 3)
        assert _scores(answer) == pytest.approx(_alone(states["byte"], crops), abs=1e-5)

    asyncio.run(run())
    base, byte = host.followers["base"].current, host.followers["byte"].current
    assert byte.sharing.stages == ["stem"]  # layer1 differs in one byte: it and all after
    assert byte.module.layer1 is not base.module.layer1
    assert byte.module.conv1 is base.module.conv1
    for follower in list(host.followers.values()):
        follower.stop()


def test_hot_loading_one_variant_leaves_the_others_as_they_were(store: ObjectStore) -> None:
    states = _variants(13)
    reg = Registry(store)
    _publish(reg, {n: states[n] for n in ("base", "heads1", "heads2")})
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), Registry(store))
    pngs = [png_bytes(i, seed=i) for i in range(2)]

    async def answers() -> dict[str, list[float]]:
        followers = [await host.follower(n) for n in ("base", "heads1", "heads2")]
        out = await host.predict_many(followers, pngs, 3)
        return {a["model"]: _scores(a) for a in out}

    before = asyncio.run(answers())
    trunk = host.followers["heads1"].current.module.layer4
    # heads2 retrained: a new head, published and hot-loaded while the others serve
    new = dict(states["heads2"], **{"fc.weight": states["heads2"]["fc.weight"] * -1})
    _publish(reg, {"heads2": new})
    host.followers["heads2"].refresh()
    assert host.followers["heads2"].slot.swaps == 2
    after = asyncio.run(answers())
    assert after["base"] == before["base"]
    assert after["heads1"] == before["heads1"]
    assert after["heads2"] != before["heads2"]
    assert after["heads2"] == pytest.approx(_alone(new, _crops()), abs=1e-5)
    assert host.followers["heads1"].current.module.layer4 is trunk
    assert host.followers["heads2"].current.module.layer4 is trunk
    for follower in list(host.followers.values()):
        follower.stop()


def test_a_variant_reads_only_the_stages_no_resident_version_holds(store: ObjectStore) -> None:
    """With no stage cache at all: a head-only variant of a resident base reads one stage
    file (its head), a last-stage variant two (layer4 and the head); each answers as alone."""
    states = _variants(14)
    _publish(Registry(store), {n: states[n] for n in ("base", "heads1", "own4")})
    reg = Registry(store, cache=StageCache(0))  # every stage read is a store read
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), reg)
    pngs, crops = [png_bytes(i, seed=i) for i in range(2)], _crops()

    async def reads(name: str) -> int:
        before = reg.cache.misses
        answer = await host.predict(await host.follower(name), pngs, 3)
        assert _scores(answer) == pytest.approx(_alone(states[name], crops), abs=1e-5)
        return reg.cache.misses - before

    async def run() -> list[int]:
        return [await reads(n) for n in ("base", "heads1", "own4")]

    assert asyncio.run(run()) == [6, 1, 2]
    for follower in list(host.followers.values()):
        follower.stop()


def test_a_head_that_yields_nan_is_refused_beside_its_resident_trunk(store: ObjectStore) -> None:
    """A head-only variant is checked on features its resident trunk computed: a head with a
    NaN never serves, and the versions serving keep their answers."""
    from training.storage.errors import IntegrityError

    states = _variants(15)
    broken = dict(states["base"], **{"fc.bias": torch.tensor([0.0, float("nan"), 0.0])})
    _publish(Registry(store), {"base": states["base"], "broken": broken})
    host = ModelHost(ServeSettings(poll_interval_s=60, numeric_mode="fp32"), Registry(store))
    pngs = [png_bytes(i, seed=i) for i in range(2)]

    async def run() -> None:
        base = await host.follower("base")
        before = _scores(await host.predict(base, pngs, 3))
        with pytest.raises(IntegrityError, match="non-finite"):
            await host.follower("broken")
        assert _scores(await host.predict(base, pngs, 3)) == before

    asyncio.run(run())
    for follower in list(host.followers.values()):
        follower.stop()


def test_traced_modes_trace_a_trunk_once_for_its_variants(store: ObjectStore) -> None:
    """In a traced mode (fp32_jit here: it runs on every CPU) versions with the same trunk run
    one trace of it (one copy, counted once against the budget) and each its own head;
    merged requests run it once; each answers as the version alone in that mode."""
    from service.runtime.model_cache import resident_bytes
    from service.runtime.model_host import _rank_all
    from service.runtime.served_model import TrunkAndHead, load_served_model

    states = _variants(16)
    reg = Registry(store)
    _publish(reg, {n: states[n] for n in ("base", "heads1", "own4")})
    served = {
        n: load_served_model(reg, n, "production", mode="fp32_jit", check_speed=False)
        for n in ("base", "heads1", "own4")
    }
    base, heads1, own4 = served["base"], served["heads1"], served["own4"]
    assert (base.mode, heads1.mode) == ("fp32_jit", "fp32_jit")
    assert isinstance(base.module, TrunkAndHead)
    assert base.module.body.runnable is heads1.module.body.runnable  # one trace
    assert own4.module.body.runnable is not base.module.body.runnable  # another trunk
    assert base.split.key == heads1.split.key != own4.split.key
    assert heads1.graph_key == base.graph_key
    assert resident_bytes([base, heads1]) == resident_bytes([base]) + (3 * 512 + 3) * 4
    crops = _crops()
    x = normalize(PRE, crops)
    calls: list[int] = []
    body = base.split.body
    body.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    jobs = [(base, [crops[:1]], 3), (heads1, [crops], 3), (own4, [crops], 3)]
    answers = _rank_all(jobs)
    assert calls == [3]  # base's and heads1's rows, one pass; own4 runs its own trunk
    for (version, parts, _), (ranked, _) in zip(jobs, answers, strict=True):
        alone = version.top_k(torch.cat(parts), 3)
        assert [img[0]["label"] for img in ranked] == [img[0]["label"] for img in alone]
        # a trace's first runs and its optimised runs (TorchScript's profiling executor)
        # round differently: close, and judged like any mode by the agreement gate
        got = [r["score"] for img in ranked for r in img]
        assert got == pytest.approx([r["score"] for img in alone for r in img], abs=2e-3)
    with torch.inference_mode():  # and in fp32 the trace answers as the eager model would
        eager = build_with_weights("resnet18", dict(states["heads1"]), num_classes=3).eval()
        assert torch.allclose(heads1.logits_normalized(x), eager(x), atol=1e-4)


def test_drift_trunks_beside_traces_hold_shared_stages_once(store: ObjectStore) -> None:
    """A version served as a trace keeps an eager fp32 trunk for the drift score: versions of
    one trunk hold its stages once (the first one's), and score as each alone."""
    from conftest import publish_tiny_model
    from service.runtime.served_model import load_served_model
    from training.backbones import trunk
    from training.feature_stats import FILE

    reg = Registry(store)
    first, net = publish_tiny_model(reg, "drift1", drift=True)
    state = dict(net.state_dict(), **{"fc.bias": net.state_dict()["fc.bias"] + 1.0})
    assert first.drift is not None
    second = reg.publish(
        state,
        model="drift2",
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=first.preprocessing,
        extra_files={FILE: reg.read_file(first, FILE)},
        drift=first.drift,
    )
    one, two = (
        load_served_model(reg, m.model, m.version, mode="fp32_jit", check_speed=False, drift=True)
        for m in (first, second)
    )
    assert one.trunk is not None
    assert two.trunk is not None
    assert one.module.body.runnable is two.module.body.runnable  # one trace
    for part in ("conv1", "layer1", "layer4"):  # and one eager copy for the drift score
        assert getattr(two.trunk, part) is getattr(one.trunk, part)
    x = normalize(first.preprocessing, _crops())
    with torch.inference_mode():
        alone = one.reference.distances(trunk(net.eval(), "resnet18")(x))
    assert torch.allclose(two.feature_distances(x), alone, atol=1e-5)
