"""The data plane: every use case the HTTP API offers, with no Ray and no FastAPI in it.

The API receives one :class:`DataPlane` (``create_app(settings, dataplane)``); the Serve
deployments build one whose :class:`Predictor` calls the classifier replicas, tests and tools
one whose predictor is an in-process :class:`~service.runtime.model_host.ModelHost`. Store
calls run in threads (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from service.dataplane.captures import CaptureUseCases
from service.dataplane.feedback import FeedbackLabel, FeedbackUseCases
from service.dataplane.jobs import JobsUseCases, Scheduler
from service.dataplane.model_import import ImportRequest, PendingGraphs, import_version
from service.dataplane.quality import QualityUseCases
from service.dataplane.retrain_policies import RetrainPolicyUseCases
from service.dataplane.store_calls import store_call
from service.request_errors import NoVersionError
from service.runtime.model_host import ModelHost, build_model_host
from service.runtime.served_model import check_loadable
from service.settings import RefitSettings, ServeSettings
from training.storage.errors import NotFoundError, RefitError
from training.storage.registry import AliasRecord, Manifest, Registry
from training.storage.s3 import ObjectStore
from training.storage.stage_files import process_stage_cache

log = logging.getLogger(__name__)

Notifier = Callable[[str], Awaitable[None]]
"""Tells the replicas that a model's alias moved (best effort; they poll as well)."""


class Predictor(Protocol):
    """Runs a model: the classifier replicas, or a :class:`ModelHost` in this process."""

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Classify encoded images with the serving version of ``model``."""
        ...

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify an already preprocessed float32 batch."""
        ...

    async def predict_many(
        self, models: list[str], images: list[bytes], top_k: int
    ) -> list[dict[str, Any]]:
        """The same encoded images classified by the serving version of each model."""
        ...

    async def ready(self) -> bool:
        """Whether predictions can be served."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Loaded models, swaps, failed loads, memory (for /metrics)."""
        ...

    async def models(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: version, numeric mode and why (cheap, for listings)."""
        ...


class InProcessPredictor:
    """A :class:`Predictor` over a :class:`ModelHost` in this process."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Classify encoded images."""
        return await self.host.predict(await self.host.follower(model), images, top_k)

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify a preprocessed batch."""
        return await self.host.predict_tensor(await self.host.follower(model), x, top_k)

    async def predict_many(
        self, models: list[str], images: list[bytes], top_k: int
    ) -> list[dict[str, Any]]:
        """The same images, every model at once."""
        followers = [await self.host.follower(m) for m in models]
        return await self.host.predict_many(followers, images, top_k)

    async def ready(self) -> bool:
        """Whether the host can serve: a model loaded, or the store answering."""
        return await store_call(self.host.ready)

    async def stats(self) -> dict[str, Any]:
        """The host's statistics."""
        return self.host.stats()

    async def models(self) -> dict[str, dict[str, Any]]:
        """The host's loaded models."""
        return self.host.models()


async def _no_notice(model: str) -> None:
    return None


class DataPlane:
    """Predict, list, metadata, promote, rollback and jobs."""

    def __init__(
        self,
        *,
        registry: Registry,
        predictor: Predictor,
        jobs: JobsUseCases,
        alias: str,
        notify: Notifier = _no_notice,
        bulk: Registry | None = None,
        loop: LoopUseCases,
    ) -> None:
        """``bulk``: the registry for large writes (imports), on a store without the short
        request-path timeouts; ``registry`` by default. ``loop``: the adaptation loop's use
        cases (:func:`loop_use_cases`)."""
        self.registry, self.predictor, self.jobs = registry, predictor, jobs
        self.captures, self.feedback = loop.captures, loop.feedback
        self.quality, self.policies = loop.quality, loop.policies
        self.alias, self.notify = alias, notify
        self.bulk = bulk or registry
        self._graph_tasks: set[asyncio.Task[None]] = set()
        self._graph_exports = asyncio.Semaphore(1)

    async def label(self, model: str, label: FeedbackLabel) -> dict[str, Any]:
        """Store a label (:meth:`FeedbackUseCases.label`), then tell the job runner, whose
        retrain policies it may fire."""
        out = await self.feedback.label(model, label)
        await self.jobs.labels_arrived(model)
        return out

    # --- predictions -----------------------------------------------------------------------
    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Top-k labels per image from the serving version, with that version."""
        return await self.predictor.predict(model, images, top_k)

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Top-k labels for a preprocessed float32 batch ``[N, 3, H, W]``."""
        return await self.predictor.predict_tensor(model, x, top_k)

    async def predict_many(
        self, models: list[str], images: list[bytes], top_k: int
    ) -> list[dict[str, Any]]:
        """Top-k labels per image from the serving version of each model (one answer per
        model, in order)."""
        return await self.predictor.predict_many(models, images, top_k)

    async def ready(self) -> bool:
        """Whether the predictor answers."""
        try:
            return await self.predictor.ready()
        except Exception:
            return False

    async def stats(self) -> dict[str, Any]:
        """The predictor's statistics and the labels this process took (for /metrics)."""
        out = await self.predictor.stats()
        out["feedback"] = {f"{m} {o}": n for (m, o), n in self.feedback.counts.items()}
        return out

    # --- the registry ----------------------------------------------------------------------
    async def list_models(self) -> list[dict[str, Any]]:
        """Published models, the version the served alias points at, and how the replica
        that answers serves the models it has loaded (numeric mode, and why not others)."""
        models = await store_call(self._list_models)
        loaded = await self.predictor.models()
        for entry in models:
            served = loaded.get(entry["name"]) or {}
            if served.get("version"):
                keys = (
                    "version",
                    "mode",
                    "agreement",
                    "fallback",
                    "passed_over",
                    "shared_stages",
                    "shared_bytes",
                    "model_bytes",
                    "trunk",
                )
                entry["serving"] = {k: served.get(k) for k in keys}
        return models

    def _list_models(self) -> list[dict[str, Any]]:
        out = []
        for name in self.registry.list_models():
            try:
                record, _ = self.registry.get_alias(name, self.alias)
            except RefitError as exc:  # a damaged alias affects its own model only
                out.append({"name": name, self.alias: None, "error": exc.to_dict()["error"]})
                continue
            out.append({"name": name, self.alias: record.version if record else None})
        return out

    async def list_versions(self, model: str) -> dict[str, Any]:
        """Published versions of one model (NotFound for an unknown one)."""
        return await store_call(self._list_versions, model)

    def _list_versions(self, model: str) -> dict[str, Any]:
        versions = self.registry.list_versions(model)
        if not versions:
            raise NotFoundError(f"no model named {model!r}", field="model")
        record, _ = self.registry.get_alias(model, self.alias)
        return {
            "model": model,
            "versions": versions,
            "aliases": {self.alias: record.version if record else None},
        }

    async def manifest(self, model: str) -> Manifest:
        """The manifest of the served alias' version, checked against the alias' hash
        (NotFound for an unknown model, NoVersion when nothing serves yet)."""
        return await store_call(self._manifest, model)

    def _manifest(self, model: str) -> Manifest:
        record = self._alias_or_raise(model)
        manifest, _ = self.registry.read_manifest(
            model, record.version, expect_sha256=record.sha256
        )
        return manifest

    def _alias_or_raise(self, model: str) -> AliasRecord:
        record, _ = self.registry.get_alias(model, self.alias)
        if record is None:
            if not self.registry.list_versions(model):
                raise NotFoundError(f"no model named {model!r}", field="model")
            raise NoVersionError(f"model {model!r} has no {self.alias} version yet", field="model")
        return record

    async def import_version(
        self, req: ImportRequest, serve: ServeSettings, promote: str | None
    ) -> dict[str, Any]:
        """Publish uploaded weights as a verified version (checks first, nothing written
        when they fail), then point ``promote`` at it if given; its graphs are made after,
        in the background (:meth:`_add_graphs`). Parsing and decoding run in a worker
        thread."""
        out, pending = await asyncio.to_thread(import_version, self.bulk, req, serve)
        out["promoted"] = (
            await self.promote(req.model, out["version"], promote) if promote else None
        )
        if pending is not None:
            task = asyncio.create_task(self._add_graphs(pending))
            self._graph_tasks.add(task)  # held until done: a task only weakly referenced
            task.add_done_callback(self._graph_tasks.discard)  # may be collected mid-run
        return out

    async def _add_graphs(self, pending: PendingGraphs) -> None:
        """Make an imported version's graphs (one export at a time per process: each takes
        a process and seconds of CPU), store them as its graph set, and tell the replicas.
        A failure is logged: the version serves fp32."""
        version = pending.manifest.version
        try:
            async with self._graph_exports:
                made = await asyncio.to_thread(pending.make, self.bulk)
            if made:
                await self.notify(pending.manifest.model)
            log.info("graphs %s of %s stored", made, version)
        except Exception:
            log.exception("graphs of imported version %s not made", version)

    async def graphs_settled(self) -> None:
        """Until the graphs of imports accepted so far are stored (or failed)."""
        while self._graph_tasks:
            await asyncio.wait(set(self._graph_tasks))

    async def version_detail(self, model: str, version: str) -> dict[str, Any]:
        """One version's manifest (verified), with graphs made after it was published."""
        manifest = await store_call(self._manifest_with_graphs, model, version)
        return {
            **manifest.model_dump(
                include={"model", "version", "created_at", "backbone", "class_names"}
                | {"parent", "job_id", "metrics", "stages"}
            ),
            "graphs": {m: g.model_dump() for m, g in manifest.graphs.items()},
        }

    def _manifest_with_graphs(self, model: str, version: str) -> Manifest:
        manifest, _ = self.registry.read_manifest(model, version)
        return self.registry.with_graph_set(manifest)

    async def promote(self, model: str, version: str, alias: str) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (verified first; compare-and-swap); replicas
        follow at once."""
        return await self._move_alias(
            model,
            alias,
            lambda: self.registry.set_alias(model, alias, version, verify=check_loadable),
        )

    async def rollback(self, model: str, alias: str) -> dict[str, Any]:
        """Move ``alias`` back one step; replicas follow at once."""
        return await self._move_alias(
            model, alias, lambda: self.registry.rollback(model, alias, verify=check_loadable)
        )

    async def _move_alias(
        self, model: str, alias: str, move: Callable[[], AliasRecord]
    ) -> dict[str, Any]:
        def moved() -> tuple[AliasRecord | None, AliasRecord]:
            before, _ = self.registry.get_alias(model, alias)
            return before, move()

        before, record = await store_call(moved)
        await self.notify(model)
        return {
            "model": model,
            "alias": alias,
            "version": record.version,
            "previous": before.version if before else None,
        }


def build_dataplane(
    settings: RefitSettings,
    *,
    predictor: Predictor,
    scheduler: Scheduler,
    bulk: Registry,
    notify: Notifier = _no_notice,
) -> DataPlane:
    """The API's data plane over ``predictor`` (models in this process, or the classifier
    replicas), with jobs queued on ``scheduler``. Reads and writes that HTTP requests wait on
    go through a store with the request-path timeouts; ``bulk`` (large reads: imports,
    hot-loads) through one without."""
    store = ObjectStore(settings.s3, request_path=True)
    return DataPlane(
        registry=Registry(store),
        predictor=predictor,
        jobs=JobsUseCases(store, scheduler),
        alias=settings.serve.alias,
        notify=notify,
        bulk=bulk,
        loop=loop_use_cases(settings, Registry(store)),
    )


def in_process_dataplane(
    settings: RefitSettings, scheduler: Scheduler, *, notify: Notifier = _no_notice
) -> DataPlane:
    """A data plane whose models run in this process (a :class:`ModelHost`), with jobs
    queued on ``scheduler``: for tests and tools that need the API without Ray Serve."""
    # hot-loads: large reads, in the background;
    # stages shared with a version loaded before come from memory
    cache = process_stage_cache(settings.serve.stage_cache_mb)
    models = Registry(ObjectStore(settings.s3), cache=cache)
    host = build_model_host(settings, models)
    return build_dataplane(
        settings,
        predictor=InProcessPredictor(host),
        scheduler=scheduler,
        bulk=models,
        notify=notify,
    )


@dataclass(frozen=True)
class LoopUseCases:
    """The adaptation loop's use cases: capture, feedback, live quality, retrain policies."""

    captures: CaptureUseCases
    feedback: FeedbackUseCases
    quality: QualityUseCases
    policies: RetrainPolicyUseCases


def loop_use_cases(settings: RefitSettings, registry: Registry) -> LoopUseCases:
    """The loop's use cases over ``registry`` (the request-path store)."""
    alias = settings.serve.alias
    return LoopUseCases(
        captures=CaptureUseCases(
            registry,
            settings.capture.policy(),
            alias=alias,
            max_image_bytes=settings.serve.max_image_bytes,
        ),
        feedback=FeedbackUseCases(registry, settings),
        quality=QualityUseCases(registry, alias=alias),
        policies=RetrainPolicyUseCases(registry, alias=alias),
    )
