"""What one worker's run trains and evaluates on: its images (one byte cache across epochs),
the scan that drops unreadable ones identically on every rank, and the loaders - cached
backbone features for head-only runs, decoded images otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.backbones import head_module, trunk
from training.data import ByteCache, ImageDataset, Sample, make_loader, shared_cache
from training.feature_store import FeatureStore, trunk_id
from training.image_cache import DiskImageCache
from training.loop import Precision, extract_features
from training.preprocess import eval_transform, train_transform
from training.run_context import RunContext, RunInputs
from training.storage.s3 import ObjectStore


@dataclass
class Loaders:
    """What the epochs run on: the module that trains (the head alone on cached features)
    and its loaders."""

    trained: nn.Module
    train: Any
    val: Any
    steps_per_epoch: int
    feature_cache: bool


def _gathered(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(features, labels)`` concatenated (this rank's alone without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return part
    parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    done = [p for p in parts if p is not None and len(p[1])]
    return torch.cat([p[0] for p in done]), torch.cat([p[1] for p in done])


def _gather_lists(items: list[str]) -> list[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return sorted(items)
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return sorted(k for p in parts for k in (p or []))


class WorkerImages:
    """Datasets of this worker's samples, sharing one in-memory byte cache across epochs."""

    def __init__(self, inputs: RunInputs) -> None:
        self.inputs = inputs
        self.store = ObjectStore(inputs.s3)
        # in the job's own process (one worker), the job's cache: what training fetched, its
        # scoring and drift reference read again from memory
        t = inputs.training
        self.cache = shared_cache() or ByteCache(
            t.cache_mb * 1024 * 1024,
            DiskImageCache.for_store(self.store, t.image_cache_dir, t.image_cache_mb),
        )
        if self.cache.disk is not None:  # the node's disk serves what it holds unchanged
            self.cache.know(self.store, [s.key for s in inputs.train + inputs.val])

    def dataset(self, samples: list[Sample], *, train: bool) -> ImageDataset:
        """A dataset of ``samples`` with the train or the eval transform."""
        pre, spec = self.inputs.preprocessing, self.inputs.spec
        transform = train_transform(pre, spec.augment) if train else eval_transform(pre)
        return ImageDataset(
            self.store,
            samples,
            transform,
            max_bytes=self.inputs.training.max_image_bytes,
            max_pixels=self.inputs.training.max_image_pixels,
            cache=self.cache,
        )


class StoredFeatures:
    """A head-only run's view of the feature store (``training.feature_store``), taken
    before the scan: its trunk id, every sample's content sha256 (each rank hashes its share;
    shared by all) and the features already stored for them. An image whose features are
    stored was decoded when they were made: the scan skips it."""

    def __init__(
        self, model: nn.Module, images: WorkerImages, ctx: RunContext, precision: Precision
    ) -> None:
        inputs = images.inputs
        self.kept = FeatureStore(
            images.store, max_bytes=inputs.training.feature_store_mb * 1024 * 1024
        )
        self.trunk = trunk_id(
            trunk(model, inputs.backbone),
            inputs.backbone,
            inputs.preprocessing,
            bf16=precision.bf16,
        )
        samples = (inputs.train + inputs.val)[ctx.rank :: ctx.world_size]
        # contents whose key, ETag and size were hashed before need no fetch (names packs)
        keys = [s.key for s in samples]
        known, listed = self.kept.known_contents(keys, images.cache.know(images.store, keys))
        unknown = [s for s in samples if s.key not in known]
        shas: list[str | None]
        try:
            shas = list(images.dataset(unknown, train=False).sha256s())
        except ValueError:  # an image that cannot be fetched: hashed one by one below
            shas = [_sha_or_none(images, s) for s in unknown]
        hashed = {s.key: sha for s, sha in zip(unknown, shas, strict=True) if sha}
        self.kept.add_names({listed[k]: sha for k, sha in hashed.items() if k in listed})
        mine = [f"{key}\0{sha}" for key, sha in {**known, **hashed}.items()]
        self.sha_of = dict(item.split("\0") for item in _gather_lists(mine))
        self.found = self.kept.lookup(self.trunk, set(self.sha_of.values()))

    def known(self) -> set[str]:
        """Keys of samples whose features are stored."""
        return {key for key, sha in self.sha_of.items() if sha in self.found}


def _sha_or_none(images: WorkerImages, sample: Sample) -> str | None:
    try:
        return images.dataset([sample], train=False).sha256s()[0]
    except ValueError:  # missing or too large: the scan reports it
        return None


def scan_unreadable(
    images: WorkerImages,
    inputs: RunInputs,
    ctx: RunContext,
    state: dict[str, Any],
    known: set[str] | frozenset[str] = frozenset(),
) -> set[str]:
    """Keys of unreadable images: found once (each rank scans its share; ``known`` ones are
    not scanned), kept in the state so a resumed run drops exactly the same ones."""
    if "bad_keys" not in state:
        samples = [s for s in inputs.train + inputs.val if s.key not in known]
        everything = images.dataset(samples, train=False)
        mine = list(range(ctx.rank, len(everything), ctx.world_size))
        state["bad_keys"] = _gather_lists(everything.find_unreadable(mine))
    return set(state["bad_keys"])


def data_error(inputs: RunInputs, bad: set[str], train: list[Sample], val: list[Sample]) -> str:
    """Why the data cannot be trained on, or ``""``."""
    total = len(inputs.train) + len(inputs.val)
    limit = inputs.spec.max_corrupt_fraction
    limit = inputs.training.max_corrupt_fraction if limit is None else limit
    if len(bad) > limit * total or not train or not val:
        return (
            f"{len(bad)} of {total} images are unreadable (limit {limit:.0%}); "
            f"examples: {sorted(bad)[:3]}"
        )
    return ""


def feature_loaders(
    model: nn.Module,
    images: WorkerImages,
    train: list[Sample],
    val: list[Sample],
    ctx: RunContext,
    precision: Precision,
    stored: StoredFeatures | None = None,
) -> Loaders:
    """Head only: the trunk runs once per image (and not at all for an image whose features
    ``stored`` has); the epochs train the head on the features. Each rank computes its share;
    the training features are then gathered, so that the sampler shards the whole set."""
    inputs = images.inputs
    spec, backbone = inputs.spec, inputs.backbone
    body = trunk(model, backbone)

    def compute(samples: list[Sample]) -> torch.Tensor:
        loader = make_loader(
            images.dataset(samples, train=False), batch_size=spec.batch_size, shuffle=False
        )
        feats, _ = extract_features(body, loader, precision=precision)
        return feats

    def features(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        mine = samples[ctx.rank :: ctx.world_size]
        labels = torch.tensor([s.label for s in mine], dtype=torch.long)
        if stored is None or not mine:
            return (compute(mine) if mine else torch.empty(0)), labels
        shas = [stored.sha_of[s.key] for s in mine]
        missing = [i for i, sha in enumerate(shas) if sha not in stored.found]
        new = compute([mine[i] for i in missing]) if missing else torch.empty(0)
        fresh = {shas[i]: new[n] for n, i in enumerate(missing)}
        stored.kept.add(stored.trunk, fresh)
        stored.found.update(fresh)
        return torch.stack([stored.found[sha] for sha in shas]), labels

    feats_tr, feats_va = _gathered(features(train)), features(val)
    train_ds = TensorDataset(*feats_tr)
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, seed=spec.seed)
        if ctx.world_size > 1
        else None
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=spec.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        # its own generator: the order is the seed's, however many features were computed
        # (every loader iterated before draws from the global one)
        generator=torch.Generator().manual_seed(spec.seed) if sampler is None else None,
    )
    return Loaders(
        trained=ctx.wrap_model(head_module(model, backbone)),
        train=train_loader,
        val=DataLoader(TensorDataset(*feats_va), batch_size=spec.batch_size),
        steps_per_epoch=len(train_loader),
        feature_cache=True,
    )


def image_loaders(
    net: nn.Module, images: WorkerImages, train: list[Sample], val: list[Sample], ctx: RunContext
) -> Loaders:
    """Every other policy: the whole (DDP-wrapped) model trains on decoded images."""
    spec = images.inputs.spec
    train_loader = make_loader(
        images.dataset(train, train=True),
        batch_size=spec.batch_size,
        shuffle=True,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=spec.seed,
        num_workers=images.inputs.training.loader_workers,
    )
    val_loader = make_loader(
        images.dataset(val, train=False),
        batch_size=spec.batch_size,
        shuffle=False,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    return Loaders(ctx.wrap_model(net), train_loader, val_loader, len(train_loader), False)
