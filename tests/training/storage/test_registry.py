"""Publishing, verified loading, aliases and rollback against a real SeaweedFS."""

from __future__ import annotations

import json

import pytest
import torch

from training.backbones import build_backbone
from training.preprocessing_spec import Preprocessing
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, SpecError
from training.storage.registry import MANIFEST_FILE, WEIGHTS_FILE, Registry
from training.storage.s3 import ObjectStore


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
