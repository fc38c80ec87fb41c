"""Weights from the torch hub cache, safetensors URIs and published versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from training.backbones import build_backbone
from training.job_settings import TrainingSettings
from training.spec import BaseModelSpec
from training.storage.errors import IntegrityError, SpecError, WeightsUnavailableError
from training.storage.s3 import ObjectStore
from training.weights import hub_cache_file, load_base_weights, resolve_base, torchvision_weights


def test_enum_from_populated_hub_cache(store: ObjectStore, tmp_torch_home: Path) -> None:
    enum = torchvision_weights("resnet18", "IMAGENET1K_V1")
    path = hub_cache_file(enum)
    assert str(path).startswith(str(tmp_torch_home))
    ref = build_backbone("resnet18", num_classes=1000).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(ref, path)
    base = resolve_base(
        BaseModelSpec(backbone="resnet18", weights="IMAGENET1K_V1"),
        store=store,
        training=TrainingSettings(),
    )
    assert base.preprocessing.crop_size == 224
    assert base.parent.endswith("IMAGENET1K_V1")
    model = build_backbone("resnet18", num_classes=5)
    load_base_weights(model, "resnet18", base.state_dict, keep_head=False)
    assert torch.equal(model.layer1[0].conv1.weight, ref["layer1.0.conv1.weight"])
    assert model.fc.out_features == 5


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_hub_cache_file_is_never_unpickled(
    store: ObjectStore, tmp_torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = hub_cache_file(torchvision_weights("resnet18", "IMAGENET1K_V1"))
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": _Evil()}, path)
    with pytest.raises(IntegrityError):
        resolve_base(
            BaseModelSpec(backbone="resnet18", weights="IMAGENET1K_V1"),
            store=store,
            training=TrainingSettings(),
        )
    assert not (tmp_path / "PWNED").exists()


def test_enum_missing_from_cache_is_clear(store: ObjectStore, tmp_torch_home: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_base(
            BaseModelSpec(backbone="resnet18", weights="IMAGENET1K_V1"),
            store=store,
            training=TrainingSettings(),
        )
    assert "torch hub cache" in err.value.message
    assert err.value.status == 424


def test_unknown_enum_lists_valid(store: ObjectStore) -> None:
    with pytest.raises(SpecError, match="IMAGENET1K_V1") as err:
        resolve_base(
            BaseModelSpec(backbone="resnet18", weights="IMAGENET9K"),
            store=store,
            training=TrainingSettings(),
        )
    assert err.value.field == "base.weights"


def _file_base(uri: str, training: TrainingSettings) -> BaseModelSpec:
    # file:// weights pass spec validation only where the settings name a weights directory
    raw = {"backbone": "mobilenet_v3_small", "weights": uri}
    return BaseModelSpec.model_validate(raw, context={"training": training})


def test_safetensors_from_s3_and_file(store: ObjectStore, tmp_path: Path) -> None:
    ref = build_backbone("mobilenet_v3_small", num_classes=1000).state_dict()
    store.put_bytes("weights/mnv3.safetensors", save(ref))
    base = resolve_base(
        BaseModelSpec(backbone="mobilenet_v3_small", weights=store.uri("weights/mnv3.safetensors")),
        store=store,
        training=TrainingSettings(),
    )
    assert set(base.state_dict) == set(ref)
    save_file(ref, tmp_path / "w.safetensors")
    allowed = TrainingSettings(local_weights_dir=tmp_path)
    base = resolve_base(
        _file_base(f"file://{tmp_path}/w.safetensors", allowed),
        store=store,
        training=allowed,
    )
    assert base.state_dict is not None
    for uri, settings in [
        (f"file://{tmp_path}/w.safetensors", TrainingSettings()),
        ("file:///etc/passwd", allowed),
        (f"file://{tmp_path}/../{tmp_path.name}/x.safetensors", allowed),
    ]:
        with pytest.raises(SpecError):
            resolve_base(_file_base(uri, allowed), store=store, training=settings)
    with pytest.raises(ValueError, match="LOCAL_WEIGHTS_DIR"):  # refused when the spec is made
        BaseModelSpec(backbone="mobilenet_v3_small", weights=f"file://{tmp_path}/w.safetensors")


def test_wrong_architecture_is_named(store: ObjectStore) -> None:
    store.put_bytes(
        "weights/r18.safetensors", save(build_backbone("resnet18", num_classes=10).state_dict())
    )
    base = resolve_base(
        BaseModelSpec(backbone="resnet50", weights=store.uri("weights/r18.safetensors")),
        store=store,
        training=TrainingSettings(),
    )
    with pytest.raises(SpecError, match="do not fit resnet50"):
        load_base_weights(
            build_backbone("resnet50", num_classes=3), "resnet50", base.state_dict, keep_head=False
        )


def test_prefetch_checks_names_and_reports_cached_files(tmp_torch_home: Path) -> None:
    from training.weights import prefetch

    with pytest.raises(SpecError) as exc:
        prefetch(["resnet18"])
    assert exc.value.field == "weights"
    with pytest.raises(SpecError) as exc:
        prefetch(["resnet9000:DEFAULT"])
    assert "resnet18" in str(exc.value)  # lists the valid backbones
    # already cached: nothing to download, the file is verified loadable and reported
    enum = torchvision_weights("resnet18", "IMAGENET1K_V1")
    path = hub_cache_file(enum)
    path.parent.mkdir(parents=True)
    torch.save(build_backbone("resnet18", num_classes=1000).state_dict(), path)
    assert prefetch(["resnet18:IMAGENET1K_V1"]) == [path]
    # not cached and no network here: a clear error, not a traceback
    with pytest.raises(WeightsUnavailableError):
        prefetch(["resnet34:IMAGENET1K_V1"])
