"""Head-only features kept on the store per trunk and image content (``training.feature_store``)
on a real SeaweedFS: lookups, merging, bounds, damaged packs, trunk ids; and a head-only run
that computes features only for the images its trunk has not seen, training the same head
as a run that computes them all."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import SMALL_PRE, png_bytes, small_run_inputs, write_imagefolder
from service.settings import RefitSettings
from training.backbones import build_backbone, trunk
from training.feature_store import MAX_PACKS, NAMES_PREFIX, PREFIX, FeatureStore, trunk_id
from training.local_fit import fit_here
from training.storage.s3 import ObjectStore

PRE = SMALL_PRE
TRUNK = "ab" * 32


def _sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _rows(ns: range, dim: int = 4) -> dict[str, torch.Tensor]:
    return {_sha(n): torch.full((dim,), float(n)) for n in ns}


def _packs(store: ObjectStore, trunk: str = TRUNK) -> list[str]:
    return [o.key for o in store.list(f"{PREFIX}{trunk}/")]


def test_lookup_returns_the_stored_rows_and_only_those(store: ObjectStore) -> None:
    kept = FeatureStore(store, max_bytes=1 << 20)
    assert kept.lookup(TRUNK, {_sha(1)}) == {}
    kept.add(TRUNK, _rows(range(5)))
    kept.add(TRUNK, _rows(range(5, 8)))
    found = kept.lookup(TRUNK, {_sha(n) for n in (1, 6, 99)})
    assert sorted(found) == sorted([_sha(1), _sha(6)])
    assert torch.equal(found[_sha(6)], torch.full((4,), 6.0))
    assert kept.lookup("cd" * 32, {_sha(1)}) == {}  # another trunk shares nothing


def test_packs_merge_at_the_limit_and_keep_every_row(store: ObjectStore) -> None:
    kept = FeatureStore(store, max_bytes=1 << 20)
    for n in range(MAX_PACKS):
        kept.add(TRUNK, _rows(range(n * 3, n * 3 + 3)))
    assert len(_packs(store)) == MAX_PACKS
    kept.add(TRUNK, _rows(range(100, 102)))
    assert len(_packs(store)) == 1
    wanted = {_sha(n) for n in [*range(MAX_PACKS * 3), 100, 101]}
    assert kept.lookup(TRUNK, wanted).keys() == wanted


def test_damaged_and_oversized_packs_are_skipped_never_trusted(store: ObjectStore) -> None:
    kept = FeatureStore(store, max_bytes=1 << 20)
    kept.add(TRUNK, _rows(range(3)))
    store.put_bytes(f"{PREFIX}{TRUNK}/{'9' * 20}-{'0' * 12}.safetensors", b"not a pack")
    assert kept.lookup(TRUNK, {_sha(0), _sha(2)}).keys() == {_sha(0), _sha(2)}
    small = FeatureStore(store, max_bytes=64)  # smaller than any pack: computed instead
    assert small.lookup(TRUNK, {_sha(0)}) == {}
    with pytest.raises(ValueError):
        kept.lookup("../other", {_sha(0)})  # a trunk id is a sha256, nothing else


def test_trunk_id_follows_content_preprocessing_and_precision() -> None:
    torch.manual_seed(0)
    a = trunk(build_backbone("resnet18", num_classes=3), "resnet18")
    b = trunk(build_backbone("resnet18", num_classes=5), "resnet18")  # another head only
    b.load_state_dict(a.state_dict())
    assert trunk_id(a, "resnet18", PRE, bf16=False) == trunk_id(b, "resnet18", PRE, bf16=False)
    assert trunk_id(a, "resnet18", PRE, bf16=False) != trunk_id(a, "resnet18", PRE, bf16=True)
    other = PRE.model_copy(update={"crop_size": 24})
    assert trunk_id(a, "resnet18", PRE, bf16=False) != trunk_id(a, "resnet18", other, bf16=False)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert trunk_id(a, "resnet18", PRE, bf16=False) != trunk_id(b, "resnet18", PRE, bf16=False)


def _head_only(
    store: ObjectStore, settings: RefitSettings, tmp_path: Path, job_id: str, mb: int
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same random trunk every run: one trunk id
    base = build_backbone("resnet18", num_classes=2).state_dict()
    inputs = small_run_inputs(
        store,
        settings,
        "heads",
        policy="head_only",
        epochs=3,
        training={"feature_store_mb": mb},
        base_state=base,
    )
    torch.manual_seed(1)
    result = fit_here(inputs, job_id=job_id, workdir=tmp_path)
    assert result.best_weights is not None
    return result.best_weights


def test_a_head_only_retrain_computes_only_new_images_features(
    store: ObjectStore, settings: RefitSettings, tmp_path: Path
) -> None:
    write_imagefolder(store, "heads", classes=2, train=6, val=3)
    first = _head_only(store, settings, tmp_path, "heads-1", mb=64)
    packs = [o.key for o in store.list(PREFIX) if not o.key.startswith(NAMES_PREFIX)]
    names = [o.key for o in store.list(NAMES_PREFIX)]
    assert len(names) == 1  # every image it hashed, under its key, ETag and size
    assert len(store.get_json(names[0])["names"]) == 18
    # one trunk, one pack: 12 rows for 18 images, since write_imagefolder's val images are
    # byte-identical to its first train images (by content, they share their rows)
    assert len(packs) == 1
    assert len(FeatureStore(store, max_bytes=1 << 20)._read(packs[0].split("/")[1], None)) == 12
    # four new labelled images: the retrain computes their features alone
    for i in range(4):
        store.put_bytes(
            f"datasets/heads/train/c{i % 2}/new-{i}.png", png_bytes(i % 2, seed=900 + i)
        )
    cached = _head_only(store, settings, tmp_path, "heads-2", mb=64)
    new = [
        o.key
        for o in store.list(PREFIX)
        if o.key not in packs and not o.key.startswith(NAMES_PREFIX)
    ]
    assert len(new) == 1
    # it hashed only the four new images: the others' contents were known by their ETags
    added = [o.key for o in store.list(NAMES_PREFIX) if o.key not in names]
    assert [len(store.get_json(k)["names"]) for k in added] == [4]
    trunk_key = new[0].split("/")[1]
    assert len(FeatureStore(store, max_bytes=1 << 20)._read(trunk_key, None)) == 16
    assert new[0] != packs[0]
    from safetensors.torch import load

    assert load(store.get_bytes(new[0]))["sha256"].shape[0] == 4
    # the same training as a run that computes every feature
    fresh = _head_only(store, settings, tmp_path, "heads-3", mb=0)
    assert fresh.keys() == cached.keys()
    diff = max(float((fresh[k] - cached[k]).abs().max()) for k in fresh)
    assert diff < 1e-4, diff  # batch shapes differ: float noise, not other features
    assert not all(torch.equal(first[k], cached[k]) for k in first)  # it did see more data


def test_contents_are_known_by_key_etag_and_size_until_an_object_changes(
    store: ObjectStore,
) -> None:
    kept = FeatureStore(store, max_bytes=1 << 20)
    keys = [f"datasets/named/c0/{i}.png" for i in range(5)]
    for i, key in enumerate(keys):
        store.put_bytes(key, png_bytes(0, seed=i))
    known, listed = kept.known_contents([*keys, "datasets/named/c0/gone.png"])
    assert known == {}
    assert set(listed) == set(keys)  # a key that is not there is not listed
    shas = {k: hashlib.sha256(store.get_bytes(k)).hexdigest() for k in keys}
    kept.add_names({listed[k]: shas[k] for k in keys})
    assert kept.known_contents(keys)[0] == shas
    store.put_bytes(keys[0], png_bytes(1, seed=99))  # rewritten: a new ETag, so unknown
    known, _ = kept.known_contents(keys)
    assert set(known) == set(keys[1:])
    store.put_bytes(f"{NAMES_PREFIX}{'0' * 20}-{'a' * 12}.json", b"{broken")  # skipped
    assert set(kept.known_contents(keys)[0]) == set(keys[1:])
