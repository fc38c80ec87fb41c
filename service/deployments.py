"""The Ray Serve deployments: the only module that touches ``ray.serve``.

* ``Classifier`` holds models in a per-replica LRU (``@serve.multiplexed``), each in a
  :class:`ModelSlot` that a background thread keeps on the alias' version (poll; load, verify,
  warm up off the request path; swap between batches). Requests are decoded against the
  version they will run on and merged by ``@serve.batch``, whose batches queue in a
  :class:`~service.batching.ForwardLane` that runs one forward at a time; a forward pass is
  split by loaded model object, so it never mixes versions.
* ``Ingress`` is the FastAPI app of :mod:`service.api` with a backend that calls the
  classifier through its handle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import logging
import os
import threading
import weakref
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.api import create_app
from service.batching import ForwardLane
from service.errors import BadRequestError, NoVersionError, OverloadedError
from service.images import decode_request_images
from service.jobs import JobsBackend, unwrap
from service.model import ModelSlot, ServedModel, load_served_model
from training.errors import NotFoundError
from training.events import events_actor, notify_async
from training.preprocess import normalize
from training.registry import Registry
from training.settings import RefitSettings, get_settings
from training.store import ObjectStore

log = logging.getLogger("refit.serve")

_Item = tuple[ServedModel, torch.Tensor, int]
_Ranked = list[list[dict[str, Any]]]


class _LaneWarningFilter(logging.Filter):
    """Drops Serve's warning that ``max_batch_size * max_concurrent_batches`` exceeds
    ``max_ongoing_requests``: the classifier admits as many batches as it has requests on
    purpose (they merge in the lane), so the warning's advice does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in str(record.msg)


def _trim_heap() -> None:
    # glibc keeps freed model memory in its heap; hand it back to the OS after a swap so
    # RSS stays flat across hot-loads (a no-op under jemalloc or musl).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    # current resident set (not the peak): /proc/self/statm, field 2, in pages
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(served: ServedModel, x: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    return served.rank(served.logits_normalized(x), k)


class _Follower:
    """Keeps one model's slot on the alias' version: polls, loads off the request path,
    swaps; a failed load keeps the old model and is counted."""

    def __init__(self, registry: Registry, settings: RefitSettings, name: str) -> None:
        self.registry, self.settings, self.name = registry, settings, name
        self.slot = ModelSlot()
        self.failed_loads = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loading = threading.Lock()  # a push and a poll never load the same version twice

    def load_now(self) -> None:
        """Load the alias' version if it differs from the slot's (raises on failure)."""
        with self._loading:
            self._load()

    def refresh(self) -> None:
        """:meth:`load_now`, with a failure counted and logged instead of raised."""
        try:
            self.load_now()
        except Exception as exc:  # keep serving the old model; report the failure
            self.failed_loads += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("hot-load of %s failed: %s", self.name, self.last_error)

    def _load(self) -> None:
        s = self.settings.serve
        record, _ = self.registry.get_alias(self.name, s.alias)
        if record is None:
            if not self.registry.list_versions(self.name):
                raise NotFoundError(f"no model named {self.name!r}", field="model")
            raise NoVersionError(f"model {self.name!r} has no {s.alias} version yet", field="model")
        current = self.slot.current
        if current is not None and current.version == record.version:
            return
        served = load_served_model(self.registry, self.name, record.version, mode=s.numeric_mode)
        if served.fallback:
            log.warning(
                "%s %s: fp32 serves, not %s: %s",
                self.name,
                record.version,
                s.numeric_mode,
                served.fallback,
            )
        self.slot.swap(served)
        del served, current  # the old model is freed once its last batch returns
        gc.collect()
        _trim_heap()
        log.info("model %s now serves %s", self.name, record.version)

    def start(self) -> None:
        """Start polling the alias."""
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"follow-{self.name}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.serve.poll_interval_s):
            self.refresh()

    def stop(self) -> None:
        """Stop polling (the model is evicted from this replica)."""
        self._stop.set()

    def __del__(self) -> None:
        # Serve calls __del__ when the multiplex LRU evicts a model.
        self._stop.set()


@serve.deployment
class Classifier:
    """Batched, multiplexed image classification with hot-loading."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        self.registry = Registry(ObjectStore(settings.s3))
        torch.set_num_threads(max(1, int(settings.serve.classifier_cpus)))
        # Followers the multiplex LRU holds; weak, so an evicted model really goes away.
        self._followers: weakref.WeakValueDictionary[str, _Follower] = weakref.WeakValueDictionary()
        s = settings.serve
        self._lane: ForwardLane[_Item, _Ranked] = ForwardLane(self._forward, s.max_batch_size)
        logging.getLogger("ray.serve").addFilter(_LaneWarningFilter())
        # Serve forms the batches; the lane merges those that queue behind a running forward
        # pass. Every batch must reach the lane at once (one request is the smallest batch,
        # so max_ongoing_requests batches is enough): Serve's own semaphore would hold them
        # back, formed and small, instead.
        self._batched = serve.batch(
            max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s,
            max_concurrent_batches=s.max_ongoing_requests,
        )(self._lane.submit)
        self._listener: asyncio.Task[None] | None = None
        self._pending = 0  # requests waiting for or inside a batch (queue depth)
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._split_batches = 0  # batches that held two versions (during a swap): run apart

    async def _listen(self) -> None:
        """Follow pushed registry notices: a publish or promote reaches this replica at once
        (the alias poll stays as the fallback)."""
        seen: dict[str, int] = {}
        while True:
            names = list(self._followers.keys())
            if not names:
                await asyncio.sleep(1)
                continue
            try:
                events = events_actor(self.settings)
                current = await events.wait.remote({n: seen.get(n, 0) for n in names}, 10.0)
            except Exception as exc:  # the notice actor is optional; polling still works
                log.warning("registry notices unavailable: %s", exc)
                await asyncio.sleep(5)
                continue
            for name, seq in current.items():
                if seq != seen.get(name, 0):
                    seen[name] = seq
                    follower = self._followers.get(name)
                    if follower is not None:
                        await asyncio.to_thread(follower.refresh)

    @serve.multiplexed(max_num_models_per_replica=get_settings().serve.models_per_replica)
    async def follower(self, model: str) -> _Follower:
        """This replica's follower of ``model`` (loaded on first use, LRU-evicted)."""
        f = _Follower(self.registry, self.settings, model)
        await asyncio.to_thread(f.load_now)
        f.start()
        self._followers[model] = f
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        return f

    async def predict(self, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Decode for the current version, then classify in a dynamic batch."""
        follower = await self.follower(serve.get_multiplexed_model_id())
        served = follower.slot.current
        assert served is not None  # follower() loaded one or raised
        s = self.settings.serve
        crops = await asyncio.to_thread(
            decode_request_images,
            images,
            max_image_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            preprocessing=served.preprocessing,
        )
        return await self._answer(served, normalize(served.preprocessing, crops), top_k)

    async def predict_tensor(self, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify an already preprocessed float32 batch ``[N, 3, crop, crop]``."""
        follower = await self.follower(serve.get_multiplexed_model_id())
        served = follower.slot.current
        assert served is not None
        size = served.preprocessing.crop_size
        if tuple(x.shape[1:]) != (3, size, size):
            raise BadRequestError(
                f"shape must be [N, 3, {size}, {size}] for this model", field="inputs[0].shape"
            )
        return await self._answer(served, x, top_k)

    async def _answer(self, served: ServedModel, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        self._pending += 1
        try:
            predictions = await self._batched((served, x, top_k))
        finally:
            self._pending -= 1
        return {"model": served.name, "model_version": served.version, "predictions": predictions}

    async def _forward(self, items: list[_Item]) -> list[_Ranked]:
        """One forward pass per loaded version over the lane's merged requests."""
        self._batch_sizes[len(items)] += 1
        # Group by the loaded model object: one forward per version, never a mixed batch.
        groups: dict[int, list[int]] = {}
        for i, (served, _, _) in enumerate(items):
            groups.setdefault(id(served), []).append(i)
        if len(groups) > 1:
            self._split_batches += 1
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            served = items[idx[0]][0]
            x = torch.cat([items[i][1] for i in idx])
            k = max(items[i][2] for i in idx)
            ranked = await asyncio.to_thread(_rank, served, x, k)
            start = 0
            for i in idx:
                n = items[i][1].shape[0]
                out[i] = [r[: items[i][2]] for r in ranked[start : start + n]]
                start += n
        return out

    async def ready(self) -> bool:
        """Answers while the replica's event loop runs (readiness probes: kept cheap, unlike
        :meth:`stats`, which walks the heap to count live models)."""
        return True

    def stats(self) -> dict[str, Any]:
        """This replica's loaded models, swaps, failed loads and resident memory."""
        models = {}
        for name, f in list(self._followers.items()):
            current = f.slot.current
            models[name] = {
                "version": current.version if current else None,
                "mode": current.mode if current else None,
                "agreement": current.agreement if current else None,
                "fallback": current.fallback if current else None,
                "fallback_kind": current.fallback_kind if current else None,
                "swaps": f.slot.swaps,
                "failed_loads": f.failed_loads,
                "last_error": f.last_error,
            }
        alive = sum(isinstance(o, ServedModel) for o in gc.get_objects())
        return {
            "ok": True,
            "rss_bytes": _rss_bytes(),
            "models": models,
            "models_alive": alive,
            "queue_depth": self._pending,
            "batch_sizes": dict(self._batch_sizes),
            "split_batches": self._split_batches,
        }


class _ServeBackend:
    """The API's backend: the classifier handle and the registry."""

    def __init__(self, classifier: DeploymentHandle, settings: RefitSettings) -> None:
        self.classifier = classifier
        self.settings = settings
        self.registry = Registry(ObjectStore(settings.s3))
        self.alias = settings.serve.alias
        self.jobs = JobsBackend(settings)

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        return await self._call(model, "predict", images, top_k)

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        return await self._call(model, "predict_tensor", x, top_k)

    async def _call(self, model: str, method: str, *args: Any) -> dict[str, Any]:
        try:
            handle = self.classifier.options(multiplexed_model_id=model)
            result: dict[str, Any] = await getattr(handle, method).remote(*args)
            return result
        except BackPressureError:
            raise OverloadedError(
                "the classifier's queue is full (REFIT_SERVE__MAX_QUEUED_REQUESTS)"
            ) from None
        except RayTaskError as exc:  # unwrap our own errors raised inside the replica
            raise unwrap(exc) from None

    def manifest(self, model: str) -> Any:
        """The manifest of the alias' version (OIP metadata)."""
        record, _ = self.registry.get_alias(model, self.alias)
        if record is None:
            if not self.registry.list_versions(model):
                raise NotFoundError(f"no model named {model!r}", field="model")
            raise NoVersionError(f"model {model!r} has no {self.alias} version yet", field="model")
        manifest, _ = self.registry.read_manifest(
            model, record.version, expect_sha256=record.sha256
        )
        return manifest

    async def promote(self, model: str, version: str, alias: str) -> dict[str, Any]:
        return await self._move_alias(
            model, alias, lambda: self.registry.set_alias(model, alias, version)
        )

    async def rollback(self, model: str, alias: str) -> dict[str, Any]:
        return await self._move_alias(model, alias, lambda: self.registry.rollback(model, alias))

    async def _move_alias(self, model: str, alias: str, move: Any) -> dict[str, Any]:
        """Move the alias (``move`` does the CAS write), push the change to the replicas."""
        before, _ = self.registry.get_alias(model, alias)
        record = move()
        await notify_async(self.settings, model)
        return {
            "model": model,
            "alias": alias,
            "version": record.version,
            "previous": before.version if before else None,
        }

    def list_models(self) -> list[dict[str, Any]]:
        out = []
        for name in self.registry.list_models():
            record, _ = self.registry.get_alias(name, self.alias)
            out.append({"name": name, self.alias: record.version if record else None})
        return out

    def list_versions(self, model: str) -> dict[str, Any]:
        versions = self.registry.list_versions(model)
        if not versions:
            raise NotFoundError(f"no model named {model!r}", field="model")
        record, _ = self.registry.get_alias(model, self.alias)
        return {
            "model": model,
            "versions": versions,
            "aliases": {self.alias: record.version if record else None},
        }

    async def ready(self) -> bool:
        try:
            return bool(await self.classifier.ready.remote())
        except Exception:
            return False

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.classifier.stats.remote()
        return result


@serve.deployment
@serve.ingress()
class Ingress:
    """FastAPI ingress: validation, auth, errors and metrics in front of the classifier."""

    def __init__(self, classifier: DeploymentHandle, settings: RefitSettings) -> None:
        self._backend = _ServeBackend(classifier, settings)
        self._settings = settings.serve
        try:  # start the job runner now: queued jobs resume without waiting for a request
            self._backend.jobs.runner()
        except Exception as exc:
            log.warning("job runner not started yet: %s", exc)

    def __serve_build_asgi_app__(self) -> Any:
        # Late-bound app: built in the replica after __init__, so it gets this replica's
        # backend and settings (a module-level app would be a pickled copy without them).
        app = create_app()
        app.state.backend = self._backend
        app.state.settings = self._settings
        return app


def application(settings: RefitSettings) -> Any:
    """The Serve application graph (ingress -> classifier) with options from settings."""
    s = settings.serve
    # @serve.deployment turns the classes into Deployments; the stubs still see classes.
    classifier_dep: Any = Classifier
    ingress_dep: Any = Ingress
    classifier = classifier_dep.options(
        num_replicas=s.classifier_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.classifier_cpus},
    ).bind(settings)
    # The ingress only awaits: give it room for twice what the classifiers can hold, so the
    # classifier's queue sheds load first - with our JSON 503 and Retry-After - and the
    # proxy's plain-text 503 never does.
    held = (s.max_ongoing_requests + max(0, s.max_queued_requests)) * s.classifier_replicas
    return ingress_dep.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=max(64, 2 * s.max_batch_size, -(-2 * held // s.ingress_replicas)),
        # requests wait here only while the router assigns them (bursts), never for work
        max_queued_requests=max(1024, 4 * held),
        ray_actor_options={"num_cpus": s.ingress_cpus},
    ).bind(classifier, settings)


def run(settings: RefitSettings, *, name: str = "refit") -> None:
    """Deploy on the connected Ray: HTTP on ``settings.serve.host:port``, app at ``/``."""
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(application(settings), name=name, route_prefix="/")


def shutdown() -> None:
    """Tear Serve down (tests, ``refit up`` on exit)."""
    serve.shutdown()
