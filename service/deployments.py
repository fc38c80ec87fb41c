"""The Ray Serve deployments: the only module that touches ``ray.serve``.

* ``Classifier`` holds models in a per-replica LRU (``@serve.multiplexed``), each in a
  :class:`ModelSlot` that a background thread keeps on the alias' version (poll; load, verify,
  warm up off the request path; swap between batches). Requests are decoded against the
  version they will run on and merged by ``@serve.batch``; a batch is split by loaded model
  object, so it never mixes versions.
* ``Ingress`` is the FastAPI app of :mod:`service.api` with a backend that calls the
  classifier through its handle.
"""

from __future__ import annotations

import asyncio
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
from service.errors import BadRequestError, NoVersionError, OverloadedError
from service.images import decode_request_images
from service.model import ModelSlot, ServedModel, load_served_model
from training.errors import NotFoundError, RefitError
from training.preprocess import normalize
from training.registry import Registry
from training.settings import RefitSettings, get_settings
from training.store import ObjectStore

log = logging.getLogger("refit.serve")


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

    def load_now(self) -> None:
        """Load the alias' version if it differs from the slot's (raises on failure)."""
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
            try:
                self.load_now()
            except Exception as exc:  # keep serving the old model; report the failure
                self.failed_loads += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("hot-load of %s failed: %s", self.name, self.last_error)

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
        # @serve.batch's wrapper exposes setters the type stubs do not show
        batched: Any = self._batched
        batched.set_max_batch_size(settings.serve.max_batch_size)
        batched.set_batch_wait_timeout_s(settings.serve.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=get_settings().serve.models_per_replica)
    async def follower(self, model: str) -> _Follower:
        """This replica's follower of ``model`` (loaded on first use, LRU-evicted)."""
        f = _Follower(self.registry, self.settings, model)
        await asyncio.to_thread(f.load_now)
        f.start()
        self._followers[model] = f
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
        predictions = await self._batched((served, x, top_k))
        return {"model": served.name, "model_version": served.version, "predictions": predictions}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(
        self, items: list[tuple[ServedModel, torch.Tensor, int]]
    ) -> list[list[list[dict[str, Any]]]]:
        # Group by the loaded model object: one forward per version, never a mixed batch.
        groups: dict[int, list[int]] = {}
        for i, (served, _, _) in enumerate(items):
            groups.setdefault(id(served), []).append(i)
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

    def stats(self) -> dict[str, Any]:
        """This replica's loaded models, swaps, failed loads and resident memory."""
        models = {}
        for name, f in list(self._followers.items()):
            current = f.slot.current
            models[name] = {
                "version": current.version if current else None,
                "mode": current.mode if current else None,
                "swaps": f.slot.swaps,
                "failed_loads": f.failed_loads,
                "last_error": f.last_error,
            }
        alive = sum(isinstance(o, ServedModel) for o in gc.get_objects())
        return {"ok": True, "rss_bytes": _rss_bytes(), "models": models, "models_alive": alive}


class _ServeBackend:
    """The API's backend: the classifier handle and the registry."""

    def __init__(self, classifier: DeploymentHandle, settings: RefitSettings) -> None:
        self.classifier = classifier
        self.registry = Registry(ObjectStore(settings.s3))
        self.alias = settings.serve.alias

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
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RefitError):
                raise cause from None
            raise

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

    def promote(self, model: str, version: str, alias: str) -> dict[str, Any]:
        before, _ = self.registry.get_alias(model, alias)
        record = self.registry.set_alias(model, alias, version)
        return {
            "model": model,
            "alias": alias,
            "version": record.version,
            "previous": before.version if before else None,
        }

    def rollback(self, model: str, alias: str) -> dict[str, Any]:
        before, _ = self.registry.get_alias(model, alias)
        record = self.registry.rollback(model, alias)
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
            return bool((await self.stats())["ok"])
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
    return ingress_dep.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=max(s.max_ongoing_requests, 2 * s.max_batch_size),
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.ingress_cpus},
    ).bind(classifier, settings)


def run(settings: RefitSettings, *, name: str = "refit") -> None:
    """Deploy on the connected Ray: HTTP on ``settings.serve.host:port``, app at ``/``."""
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(application(settings), name=name, route_prefix="/")


def shutdown() -> None:
    """Tear Serve down (tests, ``refit up`` on exit)."""
    serve.shutdown()
