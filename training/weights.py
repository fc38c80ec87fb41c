"""Where pretrained weights come from, all offline-capable, none unpickled unsafely.

* a torchvision weights enum name, read through the torch hub cache (``$TORCH_HOME/hub``);
* an ``s3://`` (under the configured bucket/prefix) or ``file://`` (under the configured
  local weights dir) URI of a safetensors file;
* a published Refit version, ``name@version`` or ``name@alias``, verified by the registry.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from torch import nn

from training.backbones import HEAD_MODULE, family_of
from training.job_settings import TrainingSettings
from training.preprocessing_spec import Preprocessing
from training.spec import BaseModelSpec
from training.storage.errors import IntegrityError, SpecError, WeightsUnavailableError
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore
from training.tv import models


@dataclass
class ResolvedBase:
    """A base model ready to build: backbone, weights (or None: random init), provenance."""

    backbone: str
    state_dict: dict[str, torch.Tensor] | None
    preprocessing: Preprocessing
    parent: str | None
    class_names: list[str] | None = None


def torchvision_weights(backbone: str, name: str) -> models.WeightsEnum:
    """The weights enum member for a backbone; SpecError listing valid names otherwise."""
    enum = models.get_model_weights(backbone)
    try:
        member: models.WeightsEnum = enum[name]
    except KeyError:
        valid = ", ".join(enum.__members__)
        raise SpecError(
            f"{backbone} has no weights {name!r}; valid: {valid}", field="base.weights"
        ) from None
    return member


def hub_cache_file(weights: models.WeightsEnum) -> Path:
    """Where torch hub keeps (or would keep) a weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_torchvision_state(
    weights: models.WeightsEnum, *, allow_download: bool
) -> dict[str, torch.Tensor]:
    """The enum's state dict from the torch hub cache (``weights_only`` load). Without the
    file and without permission to download, a clear WeightsUnavailableError."""
    cached = hub_cache_file(weights)
    if not cached.exists() and not allow_download:
        raise WeightsUnavailableError(
            f"{weights} is not in the torch hub cache ({cached}); pre-populate it (see the "
            "Dockerfile's PRETRAINED argument) or set REFIT_TRAINING__ALLOW_WEIGHT_DOWNLOAD=true",
            field="base.weights",
        )
    try:
        # torch.hub defaults to weights_only=False, i.e. full unpickling: never for us.
        state: dict[str, torch.Tensor] = weights.get_state_dict(progress=False, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IntegrityError(
            f"{cached} is not a plain state dict (refused to unpickle it): {exc}",
            field="base.weights",
        ) from None
    except OSError as exc:  # download attempted and failed (no network)
        raise WeightsUnavailableError(
            f"cannot fetch {weights}: {exc}", field="base.weights"
        ) from None
    return state


def prefetch(items: list[str]) -> list[Path]:
    """Download ``backbone:WEIGHTS`` items (e.g. ``resnet18:IMAGENET1K_V1``) into the torch
    hub cache - at image build time, so a cluster without internet has pretrained backbones.
    Each file is then loaded once with ``weights_only=True`` to prove it is a plain state dict."""
    paths = []
    for item in items:
        backbone, sep, name = item.partition(":")
        if not sep:
            raise SpecError(f"{item!r}: use backbone:WEIGHTS", field="weights")
        family_of(backbone)  # an unknown backbone lists the valid ones
        member = torchvision_weights(backbone, name)
        load_torchvision_state(member, allow_download=True)
        paths.append(hub_cache_file(member))
    return paths


def _safetensors_blob(uri: str, store: ObjectStore, training: TrainingSettings) -> bytes:
    if uri.startswith("s3://"):
        return store.get_bytes(store.key_from_uri(uri, field="base.weights"))
    root = training.local_weights_dir
    if root is None:
        raise SpecError(
            "file:// weights are disabled; set REFIT_TRAINING__LOCAL_WEIGHTS_DIR",
            field="base.weights",
        )
    path = Path(unquote(urlparse(uri).path)).resolve()
    if not path.is_relative_to(Path(root).resolve()) or path.suffix != ".safetensors":
        raise SpecError(f"must be a .safetensors file under {root}", field="base.weights")
    if not path.is_file():
        raise SpecError(f"no such file {path}", field="base.weights")
    return path.read_bytes()


def _safetensors_preprocessing(blob: bytes) -> Preprocessing | None:
    import tempfile

    # safe_open reads metadata without loading tensors; it wants a path.
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, framework="pt") as st:
            meta = st.metadata() or {}
    raw = meta.get("refit.preprocessing")
    return Preprocessing.model_validate(json.loads(raw)) if raw else None


def resolve_base(
    base: BaseModelSpec,
    *,
    store: ObjectStore,
    training: TrainingSettings,
    registry: Registry | None = None,
) -> ResolvedBase:
    """Turn the spec's ``base`` into a backbone, weights and preprocessing (a version read
    through ``registry``, when given: its cache, and what it learns of the stored stages)."""
    if base.version:
        name, _, ref = base.version.partition("@")
        manifest, state = (registry or Registry(store)).load(name, ref)
        if base.backbone and base.backbone != manifest.backbone:
            raise SpecError(
                f"{base.version} is a {manifest.backbone}, not {base.backbone}",
                field="base.backbone",
            )
        return ResolvedBase(
            backbone=manifest.backbone,
            state_dict=state,
            preprocessing=manifest.preprocessing,
            parent=f"{manifest.model}@{manifest.version}",
            class_names=manifest.class_names,
        )
    assert base.backbone is not None  # the spec guarantees backbone or version
    backbone = base.backbone
    family_of(backbone)
    if base.weights is None:
        return ResolvedBase(backbone, None, Preprocessing(), parent=None)
    if base.weights.startswith(("s3://", "file://")):
        blob = _safetensors_blob(base.weights, store, training)
        pre = _safetensors_preprocessing(blob) or Preprocessing()
        return ResolvedBase(backbone, st_load(blob), pre, parent=base.weights)
    enum = torchvision_weights(backbone, base.weights)
    state = load_torchvision_state(enum, allow_download=training.allow_weight_download)
    return ResolvedBase(
        backbone,
        state,
        Preprocessing.from_torchvision(enum.transforms()),
        parent=f"torchvision:{backbone}.{enum.name}",
    )


def load_base_weights(
    model: nn.Module,
    backbone: str,
    state: dict[str, torch.Tensor],
    *,
    keep_head: bool,
    assign: bool = False,
) -> None:
    """Load base weights into a freshly built model. The head is skipped unless ``keep_head``
    (same classes); every other tensor must fit exactly, else a SpecError says which.
    ``assign``: the model takes ``state``'s tensors themselves (a model built on the meta
    device; with ``keep_head``, every tensor is there)."""
    head = HEAD_MODULE[family_of(backbone)]

    def is_head(k: str) -> bool:
        return k == head or k.startswith(head + ".")

    body = {k: v for k, v in state.items() if keep_head or not is_head(k)}
    own = model.state_dict()
    wrong = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in body and (keep_head or not is_head(k))]
    unexpected = [k for k in body if k not in own]
    if wrong or missing or unexpected:
        detail = {"shape_mismatch": wrong[:5], "missing": missing[:5], "unexpected": unexpected[:5]}
        raise SpecError(f"weights do not fit {backbone}: {detail}", field="base.weights")
    if assign:  # the model's dtypes, as a copying load would give
        body = {k: v.to(own[k].dtype) for k, v in body.items()}
    model.load_state_dict(body, strict=False, assign=assign)
