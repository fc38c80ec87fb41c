"""The node's image cache between jobs (``training.image_cache``) on a real SeaweedFS: bytes
used only when they verify against the object's current ETag and size, changed objects
fetched again, damaged files dropped, the budget kept, a shared directory refused; and a
second run over the same dataset that fetches no image from the store."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import png_bytes, small_run_inputs, write_imagefolder
from service.settings import RefitSettings
from training.data import ByteCache, ImageDataset, Sample
from training.image_cache import DiskImageCache, list_names
from training.local_fit import fit_here
from training.storage.s3 import ObjectStore

IMAGE_FOLDERS = ("datasets/", "feedback/")
"""Where this module's images are: a spy counts reads of these only (a model follower an
earlier test left polling the registry reads through the same class)."""


class _Gets:
    """Counts the image fetches of one ObjectStore class (a spy on the real method)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: Counter[str] = Counter()
        real = ObjectStore.get_with_etag

        def counted(store: ObjectStore, key: str, **kw: Any) -> tuple[bytes, str]:
            if key.startswith(IMAGE_FOLDERS):
                self.keys[key] += 1
            return real(store, key, **kw)

        monkeypatch.setattr(ObjectStore, "get_with_etag", counted)


def _images(store: ObjectStore, folder: str, n: int) -> list[str]:
    keys = [f"datasets/{folder}/c{i % 2}/{i}.png" for i in range(n)]
    for i, key in enumerate(keys):
        store.put_bytes(key, png_bytes(i % 2, seed=i))
    return keys


def _dataset(store: ObjectStore, keys: list[str], cache: ByteCache) -> ImageDataset:
    return ImageDataset(store, [Sample(k, 0) for k in keys], lambda img: img, cache=cache)


def test_bytes_come_from_disk_only_while_the_object_is_unchanged(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskImageCache.for_store(store, tmp_path / "cache", 64)
    assert disk is not None
    keys = _images(store, "cached", 6)
    gets = _Gets(monkeypatch)
    first = ByteCache(1 << 20, disk)
    first.know(store, keys)
    wanted = [store.get_bytes(k) for k in keys]
    assert [_dataset(store, keys, first).fetch(Sample(k, 0)) for k in keys] == wanted
    assert sum(gets.keys.values()) == 6
    assert len(os.listdir(tmp_path / "cache")) == 6
    # a later job (a new process: a new memory cache) reads them from disk, none fetched
    store.put_bytes(keys[0], png_bytes(1, seed=77))  # rewritten: a new ETag
    wanted[0] = store.get_bytes(keys[0])
    later = ByteCache(1 << 20, disk)
    assert set(later.know(store, keys)) == set(keys)
    assert [_dataset(store, keys, later).fetch(Sample(k, 0)) for k in keys] == wanted
    assert gets.keys == Counter(dict.fromkeys(keys, 1)) + Counter({keys[0]: 1})


def test_a_damaged_file_is_dropped_and_fetched_again(store: ObjectStore, tmp_path: Path) -> None:
    disk = DiskImageCache.for_store(store, tmp_path / "cache", 64)
    assert disk is not None
    (key,) = _images(store, "damaged", 1)
    data, etag = store.get_with_etag(key)
    disk.write(key, etag, data)
    name = list_names(store, [key])[key]
    assert disk.read(name) == data
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    assert disk.read(name) is None
    assert not path.exists()
    # bytes that do not match the ETag they came with are never kept; nor other ETags
    disk.write(key, etag, data + b"x")
    disk.write(key, '"0123456789abcdef0123456789abcdef-2"', data)  # a multipart upload's
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_budget_drops_the_least_recently_used(store: ObjectStore, tmp_path: Path) -> None:
    keys = _images(store, "budget", 8)
    size = max(len(store.get_bytes(k)) for k in keys)
    disk = DiskImageCache(tmp_path, max_bytes=6 * size, store_id="one store")
    names = list_names(store, keys)
    for key in keys[:5]:
        disk.write(key, *reversed(store.get_with_etag(key)))
    for n, path in enumerate(sorted(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime)):
        os.utime(path, (n, n))  # written in order, long ago
    assert disk.read(names[keys[0]]) is not None  # used now: the newest
    for key in keys[5:]:
        disk.write(key, *reversed(store.get_with_etag(key)))
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 6 * size
    kept = {k for k in keys if disk.read(names[k]) is not None}
    assert keys[0] in kept
    assert keys[7] in kept
    assert keys[1] not in kept  # the oldest unused went first


def test_a_directory_others_can_write_is_not_used(store: ObjectStore, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert DiskImageCache.for_store(store, shared, 64) is None
    assert DiskImageCache.for_store(store, tmp_path / "off", 0) is None
    made = DiskImageCache.for_store(store, tmp_path / "new", 64)
    assert made is not None
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_a_second_run_on_the_same_images_fetches_none(
    store: ObjectStore,
    settings: RefitSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_imagefolder(store, "again", classes=2, train=4, val=2)
    gets = _Gets(monkeypatch)
    cache = {"image_cache_dir": tmp_path / "node", "image_cache_mb": 64}

    def run(name: str) -> None:
        inputs = small_run_inputs(store, settings, "again", policy="full", epochs=1, training=cache)
        result = fit_here(inputs, job_id=name, workdir=tmp_path / name)
        assert result.best_weights is not None

    run("first")
    images = [k for k in gets.keys if k.endswith(".png")]
    assert len(images) == 12
    gets.keys.clear()
    run("second")
    assert [k for k in gets.keys if k.endswith(".png")] == []


def test_cached_images_are_read_in_line_and_only_the_rest_on_the_fetch_threads(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass whose images the disk holds uses no fetch thread (a hop to a thread costs more
    than a disk read); a pass over held and new images fetches only the new ones, on the
    threads, and keeps every answer in order."""
    import hashlib
    import threading

    disk = DiskImageCache.for_store(store, tmp_path / "cache", 64)
    assert disk is not None
    keys = _images(store, "inline", 8)
    _dataset(store, keys[:5], ByteCache(1 << 20, disk)).sha256s()  # on disk now
    fetched_on: list[str] = []
    real = ObjectStore.get_with_etag

    def where(store: ObjectStore, key: str, **kw: Any) -> tuple[bytes, str]:
        if key.startswith(IMAGE_FOLDERS):
            fetched_on.append(threading.current_thread().name)
        return real(store, key, **kw)

    later = ByteCache(1 << 20, disk)
    later.know(store, keys)
    monkeypatch.setattr(ObjectStore, "get_with_etag", where)
    held = _dataset(store, keys[:5], later)
    assert held.find_unreadable(range(5)) == []
    assert held._pool is None  # no thread was started
    assert fetched_on == []
    wanted = [hashlib.sha256(store.get_bytes(k)).hexdigest() for k in keys]
    assert _dataset(store, keys, later).sha256s() == wanted
    assert len(fetched_on) == 3
    assert all(name.startswith("ThreadPoolExecutor") for name in fetched_on), fetched_on


def test_a_labelled_image_is_on_disk_before_the_retrain_reads_it(
    store: ObjectStore, settings: RefitSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from service.dataplane.feedback import _node_image_cache
    from training.storage.feedback import Feedback, FeedbackItem, content_hash

    training = settings.training.model_copy(update={"image_cache_dir": tmp_path / "cache"})
    on = settings.model_copy(update={"training": training})
    registry = type("R", (), {"store": store})()
    written = _node_image_cache(registry, on)  # type: ignore[arg-type]
    assert written is not None
    rayjob = on.model_copy(update={"training": training.model_copy(update={"launcher": "rayjob"})})
    assert _node_image_cache(registry, rayjob) is None  # type: ignore[arg-type]
    off = on.model_copy(update={"training": training.model_copy(update={"image_cache_mb": 0})})
    assert _node_image_cache(registry, off) is None  # type: ignore[arg-type]

    feedback = Feedback(store, written)
    data = png_bytes(1, seed=5)
    item = FeedbackItem(
        model="m",
        sha256=content_hash(data),
        image="png",
        label="one",
        split="train",
        labelled_at=datetime.now(UTC),
    )
    feedback.put(item, data)
    key = feedback.image_key(item)
    gets = _Gets(monkeypatch)
    job = ByteCache(1 << 20, DiskImageCache.for_store(store, tmp_path / "cache", 64))
    assert set(job.know(store, [key])) == {key}  # the job's listing names the file
    assert _dataset(store, [key], job).fetch(Sample(key, 0)) == data
    assert not gets.keys  # read from the node's disk: no fetch

    def broken(*_: Any) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(DiskImageCache, "write", broken)
    written("feedback/m/images/x.png", '"0"', b"x")  # a copy for speed: never the label's error
