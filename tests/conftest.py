"""Real parts, shared per session: one SeaweedFS, one local Ray (num_cpus pinned)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

# The suite serves in fp32 unless a test chooses a mode: numeric mode auto (the default) times
# every mode at a replica's first load and has every job make both graphs, seconds per test
# on two cores; auto has its own tests (tests/service/test_graph_modes.py). Set before any
# settings are read, so subprocesses (``refit up``) inherit it too.
os.environ.setdefault("REFIT_SERVE__NUMERIC_MODE", "fp32")
# INT8's accuracy control (a minute of CPU per graph of the suite's random nets) has its own
# test (tests/training/test_int8_agreement.py); the other exports quantize plainly.
os.environ.setdefault("REFIT_TRAINING__INT8_MIN_AGREEMENT", "0")

from service.embedded_store import Connection, EmbeddedStore
from service.settings import RefitSettings
from training.data import index_dataset
from training.job_settings import TrainingSettings
from training.preprocessing_spec import Preprocessing
from training.run_context import RunInputs
from training.spec import parse_spec
from training.storage.s3 import ObjectStore

RAY_CPUS = 3
SERVICE = str(Path(__file__).resolve().parents[1] / "service")
STORE_CALLS_ON_THE_LOOP: list[str] = []


def _service_frame_on_the_loop() -> str | None:
    """The service coroutine that (directly or through sync helpers) calls the store, when it
    does so on a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None  # a worker thread (to_thread, the store pool): where store calls belong
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(SERVICE) and code.co_flags & inspect.CO_COROUTINE:
            return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return None  # the test's own setup (on its loop), not a request the service handles


@pytest.fixture(scope="session", autouse=True)
def no_store_call_on_the_event_loop() -> Iterator[None]:
    """The rule, for every test: no service code calls the object store on an event loop
    (every store call is a boto3 call through ``ObjectStore.client``). A frozen store would
    stall every route on that loop; the calls run in threads instead."""
    original = ObjectStore.client

    def guarded(self: ObjectStore) -> object:
        where = _service_frame_on_the_loop()
        if where is not None:
            STORE_CALLS_ON_THE_LOOP.append(where)
            raise AssertionError(f"object store called on the event loop from {where}")
        return original.fget(self)  # type: ignore[attr-defined]

    ObjectStore.client = property(guarded)  # type: ignore[assignment, method-assign]
    yield
    ObjectStore.client = original  # type: ignore[method-assign]
    assert STORE_CALLS_ON_THE_LOOP == [], STORE_CALLS_ON_THE_LOOP


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Connection]:
    """A real SeaweedFS on loopback for the whole session."""
    store = EmbeddedStore(tmp_path_factory.mktemp("seaweed"), bucket="refit")
    conn = store.start()
    yield conn
    store.stop()


@pytest.fixture
def settings(seaweed: Connection) -> RefitSettings:
    """Settings on the session store, under a fresh prefix per test (isolation)."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    return RefitSettings(
        s3=seaweed.s3_settings(prefix=prefix),
        training=TrainingSettings(max_epochs=50, cpus_per_worker=1, max_failures=2),
    )


@pytest.fixture(scope="module")
def module_settings(seaweed: Connection) -> RefitSettings:
    """Settings under a prefix shared by one test module (state its tests only read)."""
    return RefitSettings(
        s3=seaweed.s3_settings(prefix=f"m-{uuid.uuid4().hex[:10]}"),
        # imports make both graphs, whatever the serving mode (tests/service/api/test_import)
        training=TrainingSettings(export_graphs=("openvino", "int8")),
    )


@pytest.fixture
def store(settings: RefitSettings) -> ObjectStore:
    """An ObjectStore under this test's prefix."""
    return ObjectStore(settings.s3)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every test that needs it; no dashboard."""
    import ray

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def train_worker_pids() -> list[int]:
    """Pids of the Ray Train workers alive in *this session's* Ray, from its GCS actor table
    (the dashboard's State API is off by design). Another Ray cluster on this host is never
    seen: the table is our cluster's own."""
    from ray._private import state

    return [
        int(actor["Pid"])
        for actor in state.actors().values()
        if actor.get("ActorClassName") == "RayTrainWorker" and actor.get("State") == "ALIVE"
    ]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server under test (``service.ports``)."""
    from service.ports import listen_port

    return listen_port()


def png_bytes(value: int, size: int = 32, *, seed: int = 0) -> bytes:
    """A small PNG whose content depends on ``value`` (learnable) plus a little noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), dtype=np.float32)
    stripe = size // 5
    img[:, value * stripe % size : value * stripe % size + stripe] = 200
    img += rng.normal(0, 20, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def write_imagefolder(
    store: ObjectStore,
    name: str,
    *,
    classes: int = 3,
    train: int = 8,
    val: int = 4,
    splits: bool = True,
    corrupt: int = 0,
) -> str:
    """A synthetic ImageFolder dataset; returns its s3:// URI. ``corrupt`` train images per
    class are garbage bytes with a .png name."""
    for c in range(classes):
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                folder = f"{split}/c{c}" if splits else f"c{c}"
                data = png_bytes(c, seed=i * 31 + c)
                if split == "train" and i < corrupt:
                    data = b"\x89PNG not really" + bytes(i)
                store.put_bytes(f"datasets/{name}/{folder}/{i:03d}.png", data)
    return store.uri(f"datasets/{name}/")


@pytest.fixture
def tmp_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache for this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def inverted_png(data: bytes) -> bytes:
    """The same PNG, inverted (light strokes on dark become dark on light): a shifted input."""
    buf = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("RGB")).save(buf, "PNG")
    return buf.getvalue()


def publish_tiny_model(
    registry, name: str, *, promote: bool = True, preprocessing=None, drift: bool = False
):
    """Publish a random resnet18 (3 classes, 32 px, calibration crops); returns the manifest
    and the module. Promotes it to ``production`` unless told not to. ``drift``: with the
    penultimate-feature statistics of 60 ``png_bytes`` images (the drift reference)."""
    import torch

    from service.runtime.images import decode_request_images
    from training.backbones import build_backbone, trunk
    from training.feature_stats import FILE, FeatureStats
    from training.preprocess import normalize
    from training.preprocessing_spec import Preprocessing

    pre = preprocessing or Preprocessing(
        resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    net = build_backbone("resnet18", num_classes=3).eval()
    calib = decode_request_images(
        [png_bytes(i % 3, seed=i) for i in range(6)],
        max_image_bytes=10**6,
        max_pixels=10**6,
        preprocessing=pre,
    )
    extra: dict[str, Any] = {}
    if drift:
        ref = decode_request_images(
            [png_bytes(i % 3, seed=100 + i) for i in range(60)],
            max_image_bytes=10**6,
            max_pixels=10**6,
            preprocessing=pre,
        )
        with torch.inference_mode():
            features = trunk(net, "resnet18")(normalize(pre, ref))
            stats = FeatureStats.fit(features, net.fc(features).argmax(dim=1))
        assert stats is not None
        extra = {"extra_files": {FILE: stats.to_bytes()}, "drift": stats.record()}
    manifest = registry.publish(
        net.state_dict(),
        model=name,
        backbone="resnet18",
        num_classes=3,
        class_names=["a", "b", "c"],
        preprocessing=pre,
        calibration=calib,
        **extra,
    )
    if promote:
        registry.set_alias(name, "production", manifest.version)
    return manifest, net


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the service's loop)."""
    return "asyncio"


@pytest.fixture
def published_app(settings: RefitSettings) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A fresh in-process app (``tests/api_app.py``) with ``digits`` served, and its parts."""
    from api_app import build_inprocess_app

    app, parts = build_inprocess_app(settings, publish=True)
    yield app, parts
    parts["close"]()


@pytest.fixture
async def published_client(published_app: tuple[Any, dict[str, Any]]) -> AsyncIterator[Any]:
    """An httpx client of ``published_app`` (through ``httpx.ASGITransport``)."""
    import httpx

    transport = httpx.ASGITransport(app=published_app[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://refit") as c:
        yield c


SMALL_PRE = Preprocessing(resize_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
"""32 px crops: what the worker-level tests train on."""


def small_run_inputs(
    store: ObjectStore,
    settings: RefitSettings,
    dataset: str,
    *,
    policy: str,
    epochs: int,
    training: dict[str, Any],
    base_state: dict[str, Any] | None = None,
) -> RunInputs:
    """What a one-worker resnet18 run of ``datasets/{dataset}/`` is handed (32 px, batch 4,
    lr 0.01, no flips), with ``training`` over the test's training settings."""
    index = index_dataset(store, store.uri(f"datasets/{dataset}/"))
    spec = parse_spec(
        {
            "model": dataset,
            "base": {"backbone": "resnet18"},
            "dataset": store.uri(f"datasets/{dataset}/"),
            "freeze": {"policy": policy},
            "epochs": epochs,
            "batch_size": 4,
            "lr": 0.01,
            "workers": 1,
            "preprocess": SMALL_PRE.model_dump(),
            "augment": {"hflip": False},
        }
    )
    return RunInputs(
        spec=spec,
        s3=settings.s3,
        training=settings.training.model_copy(update=training),
        backbone="resnet18",
        classes=index.classes,
        train=index.train,
        val=index.val,
        preprocessing=SMALL_PRE,
        base_state=base_state,
    )


def until(predicate: Any, timeout: float = 10.0) -> bool:
    """Whether ``predicate()`` turns true within ``timeout`` seconds (polled every 50 ms)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


class CriticalJob:
    """Another process on its critical path: it holds this node's job lock
    (``training.node_jobs``) at ``lock`` until :meth:`let_go`."""

    CODE = (
        "import sys; from pathlib import Path; from training.node_jobs import Critical; "
        "c = Critical(Path(sys.argv[1])); print('held', flush=True); sys.stdin.readline()"
    )

    def __init__(self, lock: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE, str(lock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        # a holder that fails exits: the read ends with it
        assert self.proc.stdout.readline().strip() == "held"

    def let_go(self) -> None:
        """The job went live: the lock is released (its process ends)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def critical_job(lock: Path) -> Iterator[CriticalJob]:
    """A :class:`CriticalJob` for the block, killed at its end."""
    job = CriticalJob(lock)
    try:
        yield job
    finally:
        job.proc.kill()
        job.proc.wait(timeout=10)
