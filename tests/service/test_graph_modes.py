"""The OpenVINO numeric modes (``openvino``, ``int8``): graphs made at publish time in a
child process, stored as verified files of the version, gated on their recorded agreement,
and refused (fp32 serves, the reason exported) when missing, disagreeing or tampered with.
Real SeaweedFS, real OpenVINO and NNCF."""

from __future__ import annotations

import pytest
import torch

from conftest import png_bytes
from service.runtime import served_model as model_module
from service.runtime.hotload import Follower
from service.runtime.images import decode_request_images
from service.runtime.served_model import load_served_model
from training.backbones import build_backbone
from training.openvino_ir import ExportChild, ir_files
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.storage.errors import ConflictError, IntegrityError, SpecError
from training.storage.registry import GRAPH_SET_FILE, GraphRecord, Manifest, Registry
from training.storage.s3 import ObjectStore

PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _crops(n: int, offset: int = 0) -> torch.Tensor:
    return decode_request_images(
        [png_bytes(i % 3, seed=offset + i) for i in range(n)],
        max_image_bytes=10**6,
        max_pixels=10**6,
        preprocessing=PRE,
    )


def _separating(net: torch.nn.Module) -> torch.nn.Module:
    """A random trunk whose head is fitted to tell the three test images apart: answers
    with clear margins, as a trained model gives (a random head's near-ties flip under any
    rounding, and agreement would measure nothing)."""
    x = normalize(PRE, _crops(24))
    y = torch.tensor([i % 3 for i in range(24)])
    head = net.fc
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        feats = net(x)
    net.fc = head
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def exported() -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    net = _separating(build_backbone("resnet18", num_classes=3).eval())
    with ExportChild() as child:  # started ahead, as a job starts it before it trains
        graphs = child.export(
            net.state_dict(),
            backbone="resnet18",
            num_classes=3,
            calibration=normalize(PRE, _crops(24)),
            held_out=normalize(PRE, _crops(8, offset=100)),
        )
    return net, graphs


def _graph_files(graphs: list) -> tuple[dict[str, bytes], dict[str, dict]]:
    """A job's graphs as a version's files and graph records."""
    files, records = {}, {}
    for g in graphs:
        xml, weights = ir_files(g.mode)
        files[xml], files[weights] = g.xml, g.weights
        records[g.mode] = {"files": [xml, weights], **g.measured()}
    return files, records


def _publish(reg: Registry, net: torch.nn.Module, graphs: list, **override: float) -> Manifest:
    files, records = _graph_files(graphs)
    for mode, agreement in override.items():  # what a job that measured less would record
        records[mode]["calibration_agreement"] = agreement
    return reg.publish(
        net.state_dict(),
        model="ov",
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=PRE,
        calibration=_crops(8, offset=200),
        extra_files=files,
        graphs=records,
    )


def test_export_measures_agreement_on_calibration_and_held_out(exported) -> None:
    _, graphs = exported
    assert [g.mode for g in graphs] == ["openvino", "int8"]
    for g in graphs:
        assert g.images == 24
        assert 0.0 <= g.calibration_agreement <= 1.0
        assert g.held_out_agreement is not None
        assert g.xml.startswith(b"<?xml")
    fp32, int8 = graphs
    assert fp32.calibration_agreement == 1.0  # the same arithmetic, another runtime
    assert len(int8.weights) < len(fp32.weights) / 3  # int8 weights


@pytest.mark.parametrize("mode", ["openvino", "int8"])
def test_graph_mode_serves_the_stored_graph(store: ObjectStore, exported, mode: str) -> None:
    net, graphs = exported
    reg = Registry(store)
    manifest = _publish(reg, net, graphs)
    assert set(manifest.graphs) == {"openvino", "int8"}
    for name in manifest.graphs[mode].files:
        assert name in manifest.files  # listed with its sha256, verified on read
    served = load_served_model(reg, "ov", manifest.version, mode=mode, check_speed=False)
    assert (served.mode, served.fallback) == (mode, None)
    assert served.agreement == manifest.graphs[mode].calibration_agreement
    x = _crops(6, offset=300)
    with torch.no_grad():
        expected = net(normalize(PRE, x))
    got = served.logits(x)
    assert got.shape == expected.shape
    tolerance = 1e-3 if mode == "openvino" else 0.5  # int8 rounds
    assert torch.allclose(got, expected, atol=tolerance), (got - expected).abs().max()


def test_missing_or_disagreeing_graphs_fall_back_to_fp32(store: ObjectStore, exported) -> None:
    net, graphs = exported
    reg = Registry(store)
    plain = _publish(reg, net, [])  # no graphs
    served = load_served_model(reg, "ov", plain.version, mode="int8", check_speed=False)
    assert (served.mode, served.fallback_kind) == ("fp32", "unavailable")
    assert "no int8 graph" in (served.fallback or "")
    low = _publish(reg, net, graphs, int8=0.95)  # the job measured 95 % agreement
    served = load_served_model(reg, "ov", low.version, mode="int8", check_speed=False)
    assert (served.mode, served.fallback_kind) == ("fp32", "agreement")
    assert "0.950 < 0.99 on 24 calibration images" in (served.fallback or "")
    assert served.logits(_crops(2)).shape == (2, 3)  # fp32 serves


def test_a_tampered_graph_never_loads(store: ObjectStore, exported) -> None:
    net, graphs = exported
    reg = Registry(store)
    manifest = _publish(reg, net, graphs)
    xml_name = manifest.graphs["int8"].files[0]
    key = f"models/ov/versions/{manifest.version}/{xml_name}"
    store.put_bytes(key, store.get_bytes(key) + b"<!-- a forged layer -->")
    with pytest.raises(IntegrityError, match="sha256"):
        load_served_model(reg, "ov", manifest.version, mode="int8", check_speed=False)


def _graph_set(graphs: list) -> tuple[dict[str, bytes], dict[str, GraphRecord]]:
    """A job's graphs as a graph set's files and records (under ``graphs/``)."""
    files, records = {}, {}
    for g in graphs:
        xml, weights = (f"graphs/{n}" for n in ir_files(g.mode))
        files[xml], files[weights] = g.xml, g.weights
        records[g.mode] = GraphRecord(files=[xml, weights], **g.measured())
    return files, records


def test_graphs_made_after_publishing_switch_the_replica_once_stored(
    store: ObjectStore, exported
) -> None:
    """A version goes live before its graphs (fp32, 'unavailable'); once its graph set is
    stored the follower loads it again and serves the graph mode, verified like a graph of
    the manifest; it does not load it a third time."""
    net, graphs = exported
    reg = Registry(store)
    plain = _publish(reg, net, [])  # published before its graphs
    reg.set_alias("ov", "production", plain.version)
    follower = Follower(reg, "ov", alias="production", mode="int8", poll_interval_s=60)
    follower.load_now()
    first = follower.current
    assert first is not None
    assert (first.mode, first.fallback_kind) == ("fp32", "unavailable")
    assert not reg.has_graph_set("ov", plain.version)
    follower.load_now()
    assert follower.current is first  # nothing new: not loaded again
    files, records = _graph_set(graphs)
    reg.publish_graph_set(plain, files, records)
    with pytest.raises(ConflictError):  # a version gets one set
        reg.publish_graph_set(plain, files, records)
    follower.load_now()
    assert follower.settled(60)  # loaded again off the call
    switched = follower.current
    assert switched is not None
    assert switched.version == plain.version
    assert (switched.mode, switched.fallback) == ("int8", None)
    follower.load_now()
    assert follower.current is switched
    assert follower.slot.swaps == 2


def test_a_graph_set_of_another_manifest_or_tampered_is_never_served(
    store: ObjectStore, exported
) -> None:
    net, graphs = exported
    reg = Registry(store)
    versions = [_publish(reg, net, []) for _ in range(2)]
    files, records = _graph_set(graphs)
    reg.publish_graph_set(versions[0], files, records)
    # the first version's set copied beside the second: it names the other manifest
    for name in [*files, GRAPH_SET_FILE]:
        src = f"models/ov/versions/{versions[0].version}/{name}"
        store.put_bytes(f"models/ov/versions/{versions[1].version}/{name}", store.get_bytes(src))
    assert reg.with_graph_set(versions[1]).graphs == {}
    served = load_served_model(reg, "ov", versions[1].version, mode="int8", check_speed=False)
    assert (served.mode, served.fallback_kind) == ("fp32", "unavailable")
    # a graph file of the set changed after it was stored: its sha256 refuses it
    key = f"models/ov/versions/{versions[0].version}/{records['int8'].files[1]}"
    store.put_bytes(key, store.get_bytes(key)[:-8])
    with pytest.raises(IntegrityError, match="sha256"):
        load_served_model(reg, "ov", versions[0].version, mode="int8", check_speed=False)
    with pytest.raises(SpecError):  # only files under graphs/
        reg.publish_graph_set(versions[1], {"model.safetensors": b"x"}, {})


def _fake_speeds(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> list[str]:
    """Timings that rank the modes as given (real timings on a shared 2-core runner rank
    them by chance); the list records what was timed."""
    timed: list[str] = []

    def fake(module: object, x: torch.Tensor, mode: str) -> float:
        timed.append(mode)
        return seconds[mode]

    monkeypatch.setattr(model_module, "_SECONDS", {})
    monkeypatch.setattr(model_module, "_seconds_per_forward", fake)
    return timed


def test_auto_serves_the_fastest_mode_that_agrees_and_says_why_not_the_others(
    store: ObjectStore, exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` weighs fp32, the torch modes and the version's graphs: the fastest that keeps
    the agreement serves, every other is listed with its reason; the first load of the
    architecture times every mode, later loads time none."""
    net, graphs = exported
    reg = Registry(store)
    speeds = {"int8": 0.1, "openvino": 0.3, "bf16_jit": 0.2, "fp32_jit": 0.5, "fp32": 1.0}
    timed = _fake_speeds(monkeypatch, speeds)
    low = _publish(reg, net, graphs, int8=0.95)  # the job measured int8 at 95 %
    served = load_served_model(reg, "ov", low.version, mode="auto", min_agreement=0.0)
    assert served.mode == "int8"  # no floor: the fastest
    assert sorted(timed) == sorted(speeds)
    strict = load_served_model(reg, "ov", low.version, mode="auto")  # min_agreement 0.99
    assert len(timed) == 5  # the same architecture: timed once
    # int8 disagrees; bf16_jit is next fastest but random-ish logits round differently in
    # bf16: whichever of it and openvino agrees first serves; fp32_jit and fp32 are slower
    assert strict.mode in ("bf16_jit", "openvino")
    reasons = {m: p.reason for m, p in strict.passed_over.items()}
    assert reasons["int8"] == "agreement"
    assert "0.950 < 0.99" in strict.passed_over["int8"].detail
    assert reasons["fp32"] == reasons["fp32_jit"] == "speed"
    assert set(reasons) == set(speeds) - {strict.mode}
    if strict.mode == "openvino":
        assert reasons["bf16_jit"] == "agreement"
    x = _crops(6, offset=300)
    with torch.no_grad():
        expected = net(normalize(PRE, x)).argmax(dim=1)
    assert torch.equal(strict.logits(x).argmax(dim=1), expected)
    # a version without graphs, with no version of its trunk resident (one would lend it
    # its graph trunk: test_versions_of_one_trunk_share_its_graph): the torch modes alone,
    # the graphs 'unavailable'
    del served, strict
    plain = _publish(reg, net, [])
    torch_only = load_served_model(reg, "ov", plain.version, mode="auto", min_agreement=0.0)
    assert torch_only.mode == "bf16_jit"
    assert {m: p.reason for m, p in torch_only.passed_over.items()} == {
        "int8": "unavailable",
        "openvino": "unavailable",
        "fp32_jit": "speed",
        "fp32": "speed",
    }
    assert len(timed) == 5


def test_auto_switches_to_a_graph_once_the_version_has_one(
    store: ObjectStore, exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``auto`` a new version answers in fp32 at once, then in the fastest torch mode
    auto chooses (off the load); once its graph set is stored the follower loads it once
    more and serves a faster graph."""
    net, graphs = exported
    _fake_speeds(
        monkeypatch, {"int8": 0.1, "openvino": 0.3, "bf16_jit": 2.0, "fp32_jit": 0.5, "fp32": 1.0}
    )
    reg = Registry(store)
    plain = _publish(reg, net, [])
    reg.set_alias("ov", "production", plain.version)
    follower = Follower(reg, "ov", alias="production", mode="auto", poll_interval_s=60)
    swapped: list[str] = []
    swap = follower.slot.swap
    follower.slot.swap = lambda m: (swapped.append(m.mode), swap(m))[1]  # type: ignore[method-assign]
    follower.load_now()
    assert swapped == ["fp32"]  # live at once; auto chooses off the load
    assert follower.settled(60)
    first = follower.current
    assert first is not None
    assert first.mode == "fp32_jit"
    follower.load_now()
    assert follower.current is first
    reg.publish_graph_set(plain, *_graph_set(graphs))
    follower.load_now()
    assert follower.settled(60)
    switched = follower.current
    assert switched is not None
    int8 = next(g for g in graphs if g.mode == "int8")
    fastest = "int8" if int8.calibration_agreement >= 0.99 else "openvino"
    assert (switched.version, switched.mode) == (plain.version, fastest)
    follower.load_now()
    assert follower.settled(1)
    assert swapped == ["fp32", "fp32_jit", fastest]
    # the wrapper's cycle (slot -> wrapper -> slot) would keep the version, and the graph
    # trunk it lends to versions of its trunk, alive into the next test
    del follower.slot.swap


def test_a_faster_mode_waits_while_a_job_on_the_node_goes_live(
    store: ObjectStore, exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto's choice (traces, compiles, timings) waits while another process on this node
    holds the critical-job lock: the version answers in fp32 meanwhile; the choice is made
    once the job lets go."""
    from conftest import critical_job
    from training.node_jobs import lock_path

    net, _ = exported
    _fake_speeds(monkeypatch, {"bf16_jit": 2.0, "fp32_jit": 0.5, "fp32": 1.0})
    reg = Registry(store)
    plain = _publish(reg, net, [])
    reg.set_alias("ov", "production", plain.version)
    with critical_job(lock_path()) as job:
        follower = Follower(reg, "ov", alias="production", mode="auto", poll_interval_s=60)
        follower.load_now()
        assert not follower.settled(1.5)  # waiting for the job
        current = follower.current
        assert current is not None
        assert current.mode == "fp32"
        job.let_go()
        assert follower.settled(60)
        chosen = follower.current
        assert chosen is not None
        assert chosen.mode == "fp32_jit"


def test_the_export_child_yields_the_cpu_to_serving_and_jobs() -> None:
    """Graphs come after a version is live: their child process runs at a lower priority
    than the process that started it (bounded wait for it to lower itself)."""
    import os
    import time

    from training.openvino_ir import EXPORT_NICENESS

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    child = ExportChild()
    try:
        deadline = time.monotonic() + 30
        pid = child._proc.pid
        while os.getpriority(os.PRIO_PROCESS, pid) == mine and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + EXPORT_NICENESS)
    finally:
        child.close()


@pytest.mark.parametrize("mode", ["openvino", "int8"])
def test_versions_of_one_trunk_share_its_graph(store: ObjectStore, exported, mode: str) -> None:
    """A head-only variant published without graphs serves in the graph mode on the graph
    its parent's trunk was cut to (one graph, counted once), its own head in torch, gated on
    its agreement here; merged requests of both run that graph once."""
    from service.runtime.model_cache import resident_bytes
    from service.runtime.model_host import _rank_all

    net, graphs = exported
    reg = Registry(store)
    parent = _publish(reg, net, graphs)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.bias"] += torch.tensor([0.05, -0.05, 0.0])  # a retrained head: same answers
    variant = reg.publish(
        state,
        model="ov-head",
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=PRE,
        calibration=_crops(8, offset=200),
    )
    assert not variant.graphs
    one = load_served_model(reg, "ov", parent.version, mode=mode, check_speed=False)
    two = load_served_model(reg, "ov-head", variant.version, mode=mode, check_speed=False)
    assert (one.mode, two.mode, two.fallback) == (mode, mode, None)
    assert one.agreement == parent.graphs[mode].calibration_agreement  # its own graph's
    assert two.agreement == 1.0  # measured here, on its 8 calibration crops
    assert one.module.body.runnable is two.module.body.runnable
    assert one.split.key == two.split.key
    assert resident_bytes([one, two]) == resident_bytes([one]) + (3 * 512 + 3) * 4
    x = _crops(6, offset=300)
    variant_net = build_backbone("resnet18", num_classes=3).eval()
    variant_net.load_state_dict(state)
    with torch.no_grad():
        expected = variant_net(normalize(PRE, x))
    tolerance = 1e-3 if mode == "openvino" else 0.5  # int8 rounds
    assert torch.allclose(two.logits(x), expected, atol=tolerance)
    calls: list[int] = []
    one.split.body.register_forward_hook(lambda _m, a, _o: calls.append(a[0].shape[0]))
    answers = _rank_all([(one, [x[:2]], 1), (two, [x], 1)])
    assert calls == [8]  # one graph pass over both versions' rows
    assert [r[0]["label"] for r in answers[1][0]] == [r[0]["label"] for r in two.top_k(x, 1)]


def test_a_variant_without_graphs_runs_its_parents_graph_trunk(
    store: ObjectStore, exported
) -> None:
    """With no version of its trunk loaded, a head-only variant that has no graph of its own
    cuts the trunk from its parent's graph (same trunk content, recorded stages); a variant
    whose trunk differs from its parent's does not, and serves as before."""
    from training.stage_digests import split_stages

    net, graphs = exported
    reg = Registry(store)
    files, records = _graph_files(graphs)
    fields = {
        "backbone": "resnet18",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "preprocessing": PRE,
        "calibration": _crops(8, offset=200),
    }
    state = {k: v.clone() for k, v in net.state_dict().items()}
    parent = reg.publish(
        split_stages(state, "resnet18", 3), model="ov", extra_files=files, graphs=records, **fields
    )
    assert parent.graphs["int8"].calibration_agreement >= 0.99
    head = dict(state, **{"fc.bias": state["fc.bias"] + torch.tensor([0.05, -0.05, 0.0])})
    variant = reg.publish(
        split_stages(head, "resnet18", 3), model="ov-head", parent=f"ov@{parent.version}", **fields
    )
    served = load_served_model(reg, "ov-head", variant.version, mode="int8", check_speed=False)
    assert (served.mode, served.fallback) == ("int8", None)
    assert served.split is not None
    # the trunk graph lent, the gate still this version's: past it, fp32 serves, and says why
    strict = load_served_model(
        reg, "ov-head", variant.version, mode="int8", check_speed=False, min_agreement=1.01
    )
    assert (strict.mode, strict.fallback_kind) == ("fp32", "agreement")
    assert "another version's" in (strict.fallback or "")
    other = dict(head, **{"layer4.1.bn2.bias": head["layer4.1.bn2.bias"] + 0.01})
    changed = reg.publish(
        split_stages(other, "resnet18", 3), model="ov-l4", parent=f"ov@{parent.version}", **fields
    )
    del served  # no version of the parent's trunk resident now
    alone = load_served_model(reg, "ov-l4", changed.version, mode="int8", check_speed=False)
    assert (alone.mode, alone.fallback_kind) == ("fp32", "unavailable")
