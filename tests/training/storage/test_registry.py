"""Publishing, verified loading, aliases and rollback against a real SeaweedFS."""

from __future__ import annotations

import json

import pytest
import torch

from service.settings import RefitSettings
from training.backbones import build_backbone
from training.preprocessing_spec import Preprocessing
from training.stage_digests import split_stages, stage_digests
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, SpecError
from training.storage.registry import MANIFEST_FILE, WEIGHTS_FILE, Registry
from training.storage.s3 import ObjectStore
from training.storage.stage_files import StageCache


def _publish(reg: Registry, model: str = "m1"):
    net = build_backbone("resnet18", num_classes=3)
    return reg.publish(
        net.state_dict(),
        model=model,
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=Preprocessing(),
        job_id="job-1",
    ), net


def test_publish_load_roundtrip(store: ObjectStore) -> None:
    reg = Registry(store)
    manifest, net = _publish(reg)
    loaded, state = reg.load("m1", manifest.version)
    assert loaded.class_names == ["a", "b", "c"]
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)
    assert reg.list_versions("m1") == [manifest.version]
    raw = store.get_json(f"models/m1/versions/{manifest.version}/{MANIFEST_FILE}")
    assert raw["files"][WEIGHTS_FILE]["sha256"] == manifest.files[WEIGHTS_FILE].sha256


def test_tampered_weights_refused(store: ObjectStore) -> None:
    reg = Registry(store)
    manifest, _ = _publish(reg)
    key = f"models/m1/versions/{manifest.version}/{WEIGHTS_FILE}"
    blob = bytearray(store.get_bytes(key))
    blob[-1] ^= 0xFF
    store.put_bytes(key, bytes(blob))
    with pytest.raises(IntegrityError):
        reg.load("m1", manifest.version)
    with pytest.raises(IntegrityError):
        reg.set_alias("m1", "production", manifest.version)


def test_tampered_manifest_refused_through_alias(store: ObjectStore) -> None:
    reg = Registry(store)
    manifest, _ = _publish(reg)
    reg.set_alias("m1", "production", manifest.version)
    key = f"models/m1/versions/{manifest.version}/{MANIFEST_FILE}"
    doc = json.loads(store.get_bytes(key))
    doc["class_names"] = ["x", "y", "z"]
    store.put_bytes(key, json.dumps(doc).encode())
    with pytest.raises(IntegrityError):
        reg.load("m1", "production")


def test_alias_history_rollback_and_cas(store: ObjectStore) -> None:
    reg = Registry(store)
    v1, _ = _publish(reg)
    v2, _ = _publish(reg)
    reg.set_alias("m1", "production", v1.version)
    reg.set_alias("m1", "production", v2.version)
    assert reg.load("m1", "production")[0].version == v2.version
    assert reg.rollback("m1").version == v1.version
    assert reg.load("m1")[0].version == v1.version
    with pytest.raises(NotFoundError):
        reg.rollback("m1")
    # a writer holding a stale ETag loses
    _, etag = reg.get_alias("m1", "production")
    reg.set_alias("m1", "production", v2.version)
    with pytest.raises(ConflictError):
        reg._write_alias("m1", "production", reg.get_alias("m1", "production")[0], etag)


def test_versions_are_never_overwritten(store: ObjectStore) -> None:
    reg = Registry(store)
    manifest, _ = _publish(reg)
    with pytest.raises(ConflictError):
        store.put_bytes(
            f"models/m1/versions/{manifest.version}/{MANIFEST_FILE}", b"{}", if_none_match=True
        )


def test_ids_are_not_paths(store: ObjectStore) -> None:
    reg = Registry(store)
    with pytest.raises(SpecError):
        reg.load("../m1", "production")
    with pytest.raises(NotFoundError):
        reg.load("nobody", "production")


def test_weights_written_ahead_make_no_version_until_published(store: ObjectStore) -> None:
    """A job writes the candidate's weights while it scores and gates it: no version exists
    until the manifest; published, the version loads as any other; discarded, nothing
    stays."""
    reg = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    upload = reg.upload_weights("m1", net.state_dict())
    assert reg.list_versions("m1") == []
    with pytest.raises(NotFoundError):
        reg.load("m1", upload.version)
    fields = {
        "backbone": "resnet18",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "preprocessing": Preprocessing(),
        "job_id": "job-1",
    }
    with pytest.raises(SpecError):
        reg.publish(upload, model="m2", **fields)
    manifest = reg.publish(upload, model="m1", **fields)
    assert manifest.version == upload.version
    assert manifest.files[WEIGHTS_FILE] == upload.entry
    _, state = reg.load("m1", manifest.version)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    refused = reg.upload_weights("m1", net.state_dict())
    assert store.exists(f"models/m1/versions/{refused.version}/{WEIGHTS_FILE}")
    reg.discard(refused)
    assert [o.key for o in store.list(f"models/m1/versions/{refused.version}/")] == []
    assert reg.list_versions("m1") == [manifest.version]


def _child_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A head-only fine-tune of ``net``: every tensor the same but the head's."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.weight"] += 0.5
    return state


_FIELDS = {
    "backbone": "resnet18",
    "num_classes": 3,
    "class_names": ["a", "b", "c"],
    "preprocessing": Preprocessing(),
}


def _stage_keys(store: ObjectStore, model: str, version: str) -> list[str]:
    return sorted(
        o.key.rsplit("/", 1)[1] for o in store.list(f"models/{model}/versions/{version}/stages/")
    )


def test_stages_stored_once_and_a_child_writes_only_what_it_changed(store: ObjectStore) -> None:
    """Weights stored stage by stage: a head-only child writes its head and names its
    parent's files for the rest; both load exactly, each verified, from a registry that has
    seen neither."""
    writer = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    parent = writer.publish(split_stages(net.state_dict(), "resnet18", 3), model="m1", **_FIELDS)
    names = [s.name for s in parent.stages]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert WEIGHTS_FILE not in parent.files
    assert _stage_keys(store, "m1", parent.version) == [f"{n}.safetensors" for n in sorted(names)]
    assert all(s.file and s.file.version == parent.version for s in parent.stages)
    assert [s.sha256 for s in parent.stages] == [
        d.sha256 for d in stage_digests(net.state_dict(), "resnet18", 3)
    ]

    child_state = _child_of(net)
    child = writer.publish(split_stages(child_state, "resnet18", 3), model="m2", **_FIELDS)
    assert _stage_keys(store, "m2", child.version) == ["head.safetensors"]
    owners = {s.name: (s.file.model, s.file.version) for s in child.stages if s.file}
    assert owners["head"] == ("m2", child.version)
    assert {owners[n] for n in names[:-1]} == {("m1", parent.version)}

    reader = Registry(store)  # learnt nothing, caches nothing
    for manifest, state in ((parent, net.state_dict()), (child, child_state)):
        _, loaded = reader.load(manifest.model, manifest.version)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_cache_reads_only_the_stages_it_lacks(store: ObjectStore) -> None:
    writer = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    parent = writer.publish(split_stages(net.state_dict(), "resnet18", 3), model="m1", **_FIELDS)
    child = writer.publish(split_stages(_child_of(net), "resnet18", 3), model="m1", **_FIELDS)
    cache = StageCache(256 * 1024 * 1024)
    reader = Registry(store, cache=cache)
    reader.load("m1", parent.version)
    assert (cache.hits, cache.misses) == (0, 6)
    _, state = reader.load("m1", child.version)
    assert (cache.hits, cache.misses) == (5, 7)  # the trunk from memory, the head read
    state["layer1.0.conv1.weight"].zero_()  # a reader's tensors are its own
    _, again = reader.load("m1", child.version)
    assert (cache.hits, cache.misses) == (11, 7)
    assert not torch.equal(again["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    small = StageCache(1024)  # smaller than a stage: holds nothing, reads everything
    Registry(store, cache=small).load("m1", child.version)
    assert (small.size, small.hits, small.misses) == (0, 0, 6)


def test_a_damaged_or_missing_stage_file_is_refused(store: ObjectStore) -> None:
    writer = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    parent = writer.publish(split_stages(net.state_dict(), "resnet18", 3), model="m1", **_FIELDS)
    child = writer.publish(split_stages(_child_of(net), "resnet18", 3), model="m1", **_FIELDS)
    key = f"models/m1/versions/{parent.version}/stages/layer2.safetensors"
    blob = bytearray(store.get_bytes(key))
    blob[-1] ^= 0xFF
    store.put_bytes(key, bytes(blob))
    for version in (parent.version, child.version):  # the child names the parent's file
        with pytest.raises(IntegrityError):
            Registry(store).load("m1", version)
        with pytest.raises(IntegrityError):
            Registry(store).set_alias("m1", "production", version)
    store.put_bytes(key, bytes(blob) + b"x")  # larger than its record: not read
    with pytest.raises(IntegrityError):
        Registry(store).load("m1", child.version)
    store.delete(key)
    with pytest.raises(IntegrityError, match="missing"):
        Registry(store).load("m1", child.version)


def test_a_manifest_naming_a_file_outside_the_versions_is_refused(store: ObjectStore) -> None:
    reg = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    manifest = reg.publish(split_stages(net.state_dict(), "resnet18", 3), model="m1", **_FIELDS)
    key = f"models/m1/versions/{manifest.version}/{MANIFEST_FILE}"
    doc = json.loads(store.get_bytes(key))
    doc["stages"][1]["file"]["model"] = "../../etc"
    store.put_bytes(key, json.dumps(doc).encode())
    with pytest.raises(IntegrityError):
        Registry(store).load("m1", manifest.version)


def test_discarding_an_upload_keeps_the_stages_it_shares(store: ObjectStore) -> None:
    reg = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    parent = reg.publish(split_stages(net.state_dict(), "resnet18", 3), model="m1", **_FIELDS)
    upload = reg.upload_weights("m1", split_stages(_child_of(net), "resnet18", 3))
    assert upload.written == (f"models/m1/versions/{upload.version}/stages/head.safetensors",)
    reg.discard(upload)
    assert _stage_keys(store, "m1", upload.version) == []
    _, state = Registry(store).load("m1", parent.version)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_stages_are_shared_only_within_one_store(settings: RefitSettings) -> None:
    """One cache serves registries of two prefixes: a version in the second never names a
    file of the first (it could not read it there)."""
    cache = StageCache(0)
    first = Registry(ObjectStore(settings.s3), cache=cache)
    other_s3 = settings.s3.model_copy(update={"prefix": settings.s3.prefix + "-other"})
    second = Registry(ObjectStore(other_s3), cache=cache)
    stages = split_stages(build_backbone("resnet18", num_classes=3).state_dict(), "resnet18", 3)
    one = first.publish(stages, model="m1", **_FIELDS)
    two = second.publish(stages, model="m1", **_FIELDS)
    assert {s.file.version for s in two.stages if s.file} == {two.version} != {one.version}
    second.load("m1", two.version)
