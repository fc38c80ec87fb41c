"""The models one process serves: followers of each model's alias, request decoding, and
one forward pass at a time over merged requests. Ray-free: the Serve classifier replica runs
one (with Serve's batching and multiplexing in front); in-process tests and tools run it as
it is.

* ``predict`` queues a request's encoded images in the
  :class:`~service.runtime.batching.ForwardLane` with the version it will run on; each
  merged batch's images are decoded on one thread just before its forward pass (or, with
  ``decode_with_batch`` off, each request's in a thread pool before it queues).
* ``_forward`` groups the merged requests by loaded model object: one forward per version,
  never a mixed batch.
* Followers are held in an LRU of ``models_per_replica`` names; a caller (the Serve edge)
  may hold them instead, through ``@serve.multiplexed``. Whoever holds them, their loaded
  versions share the byte budget of :class:`~service.runtime.model_cache.ModelCache`: the
  least recently used are parked, and load again on their next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch

from service.allocator import current_allocator
from service.request_errors import BadRequestError, OverloadedError
from service.runtime.batching import ForwardLane
from service.runtime.capture_tap import CaptureTap
from service.runtime.drift import DriftMonitor
from service.runtime.hotload import Follower, trim_heap
from service.runtime.images import decode_request_images
from service.runtime.model_cache import ModelCache
from service.runtime.served_model import ServedModel, TrunkSplit
from service.settings import RefitSettings, ServeSettings
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.storage.captures import Captures
from training.storage.drift_scores import DriftScores
from training.storage.errors import IntegrityError, RefitError
from training.storage.ids import new_prediction_id
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A request's images still encoded: decoded (every cap checked first) with the rest of
    its batch, on one thread just before the batch's forward pass."""

    images: list[bytes]


Item = tuple[ServedModel, torch.Tensor | Encoded, int]
"""One request in the lane: the version it runs on, its input ``[n, 3, H, W]`` (uint8 crops,
or float32 already normalised) or its encoded images, its top-k."""
Ranked = list[list[dict[str, Any]]]
"""Per image: the top-k ``{"label", "score"}``."""
Answer = Ranked | Exception
"""What the lane gives a request: its ranked labels, or why its images could not be decoded
(a :class:`RefitError` for a refused image: its 4xx)."""


def rss_bytes() -> int:
    """This process's current resident set (not the peak): /proc/self/statm, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_input(served: ServedModel, parts: list[torch.Tensor]) -> torch.Tensor:
    """One version's merged requests as one normalised float32 batch. Crops travel the lane
    in uint8 (a quarter of the bytes) and are normalised here, once per batch, off the event
    loop; float inputs (the protocol's preprocessed tensors) are already normalised."""
    pre = served.preprocessing
    if all(p.dtype == torch.uint8 for p in parts):
        return normalize(pre, parts[0] if len(parts) == 1 else torch.cat(parts))
    floats = [normalize(pre, p) if p.dtype == torch.uint8 else p for p in parts]
    return floats[0] if len(floats) == 1 else torch.cat(floats)


def _rank(served: ServedModel, parts: list[torch.Tensor], k: int) -> tuple[Ranked, torch.Tensor]:
    x = model_input(served, parts)
    return served.rank(served.logits_normalized(x), k), x


@torch.inference_mode()
def _rank_all(
    jobs: list[tuple[ServedModel, list[torch.Tensor], int]],
) -> list[tuple[Ranked, torch.Tensor]]:
    """Each version's ranked answers and input: alone, or (several versions whose trunks
    begin with the same stages) each distinct leading run of stages once over the inputs of
    all the versions that share it, then each version's own stages and head on its rows."""
    if len(jobs) == 1:
        return [_rank(*jobs[0])]
    # the same images for several versions (a fan-out): their input once
    inputs: dict[tuple[Any, ...], tuple[int, torch.Tensor]] = {}
    rows = 0
    spans = []
    for served, parts, _ in jobs:
        pre = served.preprocessing
        key = (tuple(id(p) for p in parts), pre.mean, pre.std)
        if key not in inputs:
            x = model_input(served, parts)
            inputs[key] = (rows, x)
            rows += x.shape[0]
        start, x = inputs[key]
        spans.append((start, start + x.shape[0]))
    splits = [served.split for served, _, _ in jobs]
    assert all(s is not None for s in splits)  # grouped by their split's root
    h = torch.cat([x for _, x in inputs.values()])
    features = _trunk_features(splits, spans, h, 0)  # type: ignore[arg-type]
    out = []
    for (served, _, k), feats, (a, b) in zip(jobs, features, spans, strict=True):
        assert served.split is not None
        out.append((served.rank(served.split.head(feats), k), h[a:b]))
    return out


def _trunk_features(
    splits: list[TrunkSplit], spans: list[tuple[int, int]], h: torch.Tensor, depth: int
) -> list[torch.Tensor]:
    """Each version's trunk features on its rows ``spans`` of ``h`` (the output of the
    stages before ``depth``, which they share): every stage from ``depth`` on runs once per
    distinct content, on the rows of the versions that hold it."""
    first = splits[0]
    if not first.runs:  # no stage pieces: the same whole trunk (grouped by it)
        features = first.body(h)
        return [features[a:b] for a, b in spans]
    if depth == len(first.runs):
        return [h[a:b] for a, b in spans]
    groups: dict[str, list[int]] = {}
    for i, split in enumerate(splits):
        groups.setdefault(split.runs[depth][0], []).append(i)
    out: list[torch.Tensor] = [h] * len(splits)
    for members in groups.values():
        sub, sub_spans = h, spans
        if len(members) < len(splits):  # only the rows of these versions, each input once
            where: dict[tuple[int, int], tuple[int, int]] = {}
            pieces: list[torch.Tensor] = []
            for a, b in dict.fromkeys(spans[i] for i in members):
                n = sum(p.shape[0] for p in pieces)
                where[(a, b)] = (n, n + b - a)
                pieces.append(h[a:b])
            sub = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            sub_spans = [where[spans[i]] for i in members]
        sub = splits[members[0]].runs[depth][1](sub)
        below = _trunk_features([splits[i] for i in members], sub_spans, sub, depth + 1)
        for i, features in zip(members, below, strict=True):
            out[i] = features
    return out


def _trunk_id(key: str) -> str:
    """A trunk's key as listed: the backbone and the first 16 hex digits of its content."""
    backbone, _, digest = key.partition("/")
    return f"{backbone}/{digest[:16]}"


class ModelHost:
    """Decode, batch and run requests on the followed versions of several models."""

    def __init__(
        self,
        settings: ServeSettings,
        registry: Registry,
        *,
        submit: Callable[[Item], Awaitable[Answer]] | None = None,
        capture: CaptureTap | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        """``submit`` queues one request for a forward pass (the Serve edge wraps the lane
        in ``@serve.batch``); by default requests go to the lane directly. ``capture`` keeps
        sampled predictions for labelling (none: nothing is captured); ``drift`` measures a
        sample of served images against the version's reference features (none: no score)."""
        self.settings, self.registry, self.capture = settings, registry, capture
        self.drift = drift if drift is not None and drift.sample_rate > 0 else None
        self.lane: ForwardLane[Item, Answer] = ForwardLane(self._forward, settings.max_batch_size)
        self._submit = submit or self._submit_one
        self._lru: collections.OrderedDict[str, Follower] = collections.OrderedDict()
        # every follower alive, whoever holds it; weak, so an evicted model really goes away
        self.followers: weakref.WeakValueDictionary[str, Follower] = weakref.WeakValueDictionary()
        self._pending = 0  # requests waiting for or inside a forward pass (queue depth)
        self._admitted = 0  # requests from admission to answer (decoding included)
        # Admission control: past this, a request is refused at once with a JSON 503 and
        # Retry-After, before it costs a decode (the Serve edge sets its own limits above
        # this, so Serve's plain-text 503 never answers a prediction).
        queued = settings.max_queued_requests
        self.admit_limit = None if queued < 0 else settings.max_ongoing_requests + queued
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._split_batches = 0  # lane batches that held two versions (during a swap)
        self._shared_trunk_passes = 0  # passes whose leading stages served several versions
        self._model_loads = 0  # cold loads: a model this process did not hold
        self._loading: dict[str, asyncio.Lock] = {}
        # which models keep a loaded version: the most recently used within the byte budget
        self.cache = ModelCache(settings.model_cache_mb * 2**20)
        # readiness asks the store with the short timeouts of the request path
        self._probe = ObjectStore(registry.store.settings, request_path=True)

    async def _submit_one(self, item: Item) -> Answer:
        return (await self.lane.submit([item]))[0]

    # --- models ----------------------------------------------------------------------------
    async def load_follower(self, model: str) -> Follower:
        """A new follower of ``model`` with its alias' version loaded (off the event loop)."""
        s = self.settings
        follower = Follower(
            self.registry,
            model,
            alias=s.alias,
            mode=s.numeric_mode,
            poll_interval_s=s.poll_interval_s,
            drift=self.drift is not None,
        )
        self._model_loads += 1
        await self._cold_load(model, follower.load_now)
        if self.capture is not None:  # the policy in force applies from the first request
            await self._cold_load(model, functools.partial(self.capture.load_policy, model))
        follower.start()
        self.followers[model] = follower
        self.cache.touch(follower)
        await self._fit()
        return follower

    async def _cold_load(self, model: str, load: Callable[[], None]) -> None:
        """Run a load of ``model`` off the event loop; a stored version that verifies yet
        will not load or run is an :class:`IntegrityError` (409), never a 500."""
        try:
            await asyncio.to_thread(load)
        except RefitError:
            raise
        except Exception as exc:
            raise IntegrityError(
                f"model {model!r}: its {self.settings.alias} version cannot be loaded: "
                f"{type(exc).__name__}: {exc}",
                field="model",
            ) from None

    async def serving(self, follower: Follower) -> ServedModel:
        """The version ``follower`` serves now (loaded again first when it was parked for
        memory); the model counts as just used."""
        current = follower.current
        if current is None:
            lock = self._loading.setdefault(follower.name, asyncio.Lock())
            try:
                async with lock:  # concurrent requests for a parked model load it once
                    if follower.current is None:
                        self._model_loads += 1
                        await self._cold_load(follower.name, follower.resume)
                    current = follower.current
            finally:
                if not lock.locked():
                    self._loading.pop(follower.name, None)
            if current is None:  # parked again meanwhile (a budget far below the traffic)
                raise OverloadedError(
                    f"model {follower.name!r} was unloaded to fit REFIT_SERVE__MODEL_CACHE_MB "
                    "while it loaded; try again"
                )
            self.cache.touch(follower)
            await self._fit()
        else:
            self.cache.touch(follower)
        return current

    async def _fit(self) -> None:
        """Park the least recently used models until the loaded ones fit the byte budget."""
        victims = self.cache.over_budget()
        if victims:
            await asyncio.to_thread(self._park, victims)

    def _park(self, victims: list[Follower]) -> None:
        for follower in victims:
            if not follower.parked:
                follower.park()
                self.cache.parks += 1
        # freed as the last batch on each returns (no cycles: no collector pass, which would
        # hold every thread for a quarter of a second)
        trim_heap()

    async def follower(self, model: str) -> Follower:
        """This process's follower of ``model`` (loaded on first use, LRU-evicted)."""
        if model in self._lru:
            self._lru.move_to_end(model)
            return self._lru[model]
        lock = self._loading.setdefault(model, asyncio.Lock())
        try:
            async with lock:  # concurrent first requests load the model once
                if model not in self._lru:
                    self._lru[model] = await self.load_follower(model)
                    while len(self._lru) > self.settings.models_per_replica:
                        _, evicted = self._lru.popitem(last=False)
                        evicted.stop()
        finally:
            # names come from clients: keep no lock for a name that nobody waits on, or
            # requests for made-up models would grow this without bound
            if not lock.locked():
                self._loading.pop(model, None)
        return self._lru[model]

    async def refresh(self, model: str) -> None:
        """Re-read ``model``'s alias now (a registry notice arrived)."""
        follower = self.followers.get(model)
        if follower is not None:
            await asyncio.to_thread(follower.refresh)

    # --- requests --------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of this host's admission places for a request, or refuse it with
        :class:`OverloadedError` when all are taken."""
        if self.admit_limit is not None and self._admitted >= self.admit_limit:
            raise OverloadedError(
                f"{self._admitted} requests are in progress on this replica "
                "(REFIT_SERVE__MAX_ONGOING_REQUESTS + MAX_QUEUED_REQUESTS)"
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def predict(self, follower: Follower, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Decode for the follower's current version, then classify in a merged batch."""
        with self.admitted():
            return await self._predict(follower, images, top_k)

    async def _predict(self, follower: Follower, images: list[bytes], top_k: int) -> dict[str, Any]:
        served = await self.serving(follower)
        if self.settings.decode_with_batch:
            result = await self._answer(served, Encoded(images), top_k)
        else:
            result = await self._answer(
                served, await self._decode(images, served.preprocessing), top_k
            )
        if self.capture is not None:
            self.capture.observe(
                served.name,
                served.version,
                result["prediction_id"],
                images,
                result["predictions"],
            )
        return result

    async def _decode(self, images: list[bytes], preprocessing: Preprocessing) -> torch.Tensor:
        """A request's images as uint8 crops for ``preprocessing``, every cap checked before
        decoding (off the event loop)."""
        return await asyncio.to_thread(self._decode_now, images, preprocessing)

    def _decode_now(self, images: list[bytes], preprocessing: Preprocessing) -> torch.Tensor:
        s = self.settings
        return decode_request_images(
            images,
            max_image_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            preprocessing=preprocessing,
            max_side=s.max_image_side,
            max_aspect=s.max_aspect_ratio,
        )

    def _decode_batch(self, items: list[Item]) -> list[torch.Tensor | Exception]:
        """Each item's input, its encoded images decoded; an item whose images are refused
        gets the error (naming ``images[i]``), and the rest of its batch runs. Any other
        failure is that item's alone too, as it was when each request decoded its own."""
        out: list[torch.Tensor | Exception] = []
        for served, x, _ in items:
            if not isinstance(x, Encoded):
                out.append(x)
                continue
            try:
                out.append(self._decode_now(x.images, served.preprocessing))
            except Exception as exc:  # this request's failure, never its batch's
                out.append(exc)
        return out

    async def predict_many(
        self, followers: list[Follower], images: list[bytes], top_k: int
    ) -> list[dict[str, Any]]:
        """The same images answered by several models at once: decoded once per
        preprocessing, then one lane submission, so versions with the same trunk run it once
        over the images (each its own head). One answer per follower, in order."""
        with self.admitted():
            served = [await self.serving(f) for f in followers]
            crops: dict[str, torch.Tensor] = {}
            for v in served:
                key = v.preprocessing.model_dump_json()
                if key not in crops:
                    crops[key] = await self._decode(images, v.preprocessing)
            items: list[Item] = [
                (v, crops[v.preprocessing.model_dump_json()], top_k) for v in served
            ]
            self._pending += len(items)
            try:
                ranked = await self.lane.submit(items)
            finally:
                self._pending -= len(items)
        answers = []
        for (v, _, _), predictions in zip(items, ranked, strict=True):
            if isinstance(predictions, Exception):  # not from decoded crops; kept exact
                raise predictions
            answer: dict[str, Any] = {
                "model": v.name,
                "model_version": v.version,
                "prediction_id": new_prediction_id(),
                "predictions": predictions,
            }
            if self.capture is not None:
                pid = answer["prediction_id"]
                self.capture.observe(v.name, v.version, pid, images, predictions)
            answers.append(answer)
        return answers

    async def predict_tensor(
        self, follower: Follower, x: torch.Tensor, top_k: int
    ) -> dict[str, Any]:
        """Classify an already preprocessed float32 batch ``[N, 3, crop, crop]``."""
        served = await self.serving(follower)
        size = served.preprocessing.crop_size
        if tuple(x.shape[1:]) != (3, size, size):
            raise BadRequestError(
                f"shape must be [N, 3, {size}, {size}] for this model", field="inputs[0].shape"
            )
        with self.admitted():
            result = await self._answer(served, x, top_k)
        if self.capture is not None:  # no encoded image to keep: counted only
            self.capture.tally(served.name, result["predictions"])
        return result

    async def _answer(
        self, served: ServedModel, x: torch.Tensor | Encoded, top_k: int
    ) -> dict[str, Any]:
        self._pending += 1
        try:
            predictions = await self._submit((served, x, top_k))
        finally:
            self._pending -= 1
        if isinstance(predictions, Exception):  # its images could not be decoded
            raise predictions
        return {
            "model": served.name,
            "model_version": served.version,
            "prediction_id": new_prediction_id(),
            "predictions": predictions,
        }

    async def _forward(self, lane_items: list[Item]) -> list[Answer]:
        """One forward pass per loaded version over the lane's merged requests; versions
        whose trunks begin with the same stages (fine-tunes of one backbone) run those once
        over all of theirs, then each the stages it does not share and its head. Encoded
        images are decoded first, on one thread, while no forward runs."""
        self._batch_sizes[len(lane_items)] += 1
        out: list[Any] = [None] * len(lane_items)
        items: list[tuple[ServedModel, torch.Tensor, int]] = []
        if any(isinstance(x, Encoded) for _, x, _ in lane_items):
            inputs = await asyncio.to_thread(self._decode_batch, lane_items)
        else:
            inputs = [x for _, x, _ in lane_items]  # type: ignore[misc]  # no Encoded here
        for i, ((served, _, k), x) in enumerate(zip(lane_items, inputs, strict=True)):
            if isinstance(x, Exception):
                out[i] = x
                x = torch.empty(0)  # never grouped below
            items.append((served, x, k))
        groups: dict[int, list[int]] = {}
        for i, (served, _, _) in enumerate(items):
            if out[i] is None:
                groups.setdefault(id(served), []).append(i)
        if len(groups) > 1:
            self._split_batches += 1
        passes: dict[Any, list[list[int]]] = {}
        for idx in groups.values():
            served, x, _ = items[idx[0]]
            split = served.split
            key = (split.root, served.mode, tuple(x.shape[1:])) if split else id(served)
            passes.setdefault(key, []).append(idx)
        for members in passes.values():
            if len(members) > 1:
                self._shared_trunk_passes += 1
            jobs = [
                (items[idx[0]][0], [items[i][1] for i in idx], max(items[i][2] for i in idx))
                for idx in members
            ]
            results = await asyncio.to_thread(_rank_all, jobs)
            for idx, (ranked, x) in zip(members, results, strict=True):
                served = items[idx[0]][0]
                if self.drift is not None:
                    self.drift.observe(served, x)
                start = 0
                for i in idx:
                    n = items[i][1].shape[0]
                    out[i] = [r[: items[i][2]] for r in ranked[start : start + n]]
                    start += n
        return out

    # --- observation -----------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether this host can serve: a model is loaded, or (none yet) the store answers
        within the request-path timeouts, so a cold load can happen. Blocking: call it off
        the event loop."""
        if any(f.current is not None for f in list(self.followers.values())):
            return True
        return self._probe.ping()

    def models(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: its version, numeric mode and why, swaps and failed loads (cheap:
        ``GET /v1/models`` reads it on every call)."""
        models = {}
        for name, f in list(self.followers.items()):
            current = f.current
            models[name] = {
                "version": current.version if current else None,
                "mode": current.mode if current else None,
                "agreement": current.agreement if current else None,
                "fallback": current.fallback if current else None,
                "fallback_kind": current.fallback_kind if current else None,
                "passed_over": {
                    m: {"reason": p.reason, "detail": p.detail}
                    for m, p in (current.passed_over if current else {}).items()
                },
                "swaps": f.slot.swaps,
                "failed_loads": f.failed_loads,
                "last_error": f.last_error,
                "shared_stages": current.sharing.stages if current and current.sharing else [],
                "shared_bytes": current.sharing.shared_bytes
                if current and current.sharing
                else None,
                "model_bytes": current.sharing.model_bytes if current and current.sharing else None,
                "trunk": _trunk_id(current.split.key) if current and current.split else None,
            }
        return models

    def _resident_trunks(self) -> int:
        """Distinct trunk contents among the eager models loaded here."""
        keys = {f.current.split.key for f in self.cache.loaded() if f.current and f.current.split}
        return len(keys)

    def _model_bytes(self) -> dict[str, int]:
        """Tensor bytes of the eager models loaded here: ``resident`` (a tensor several of
        them share counted once) and ``separate`` (what they would take each on its own)."""
        seen: dict[int, int] = {}
        separate = 0
        for follower in list(self.followers.values()):
            current = follower.current
            if current is None or current.sharing is None:
                continue
            separate += current.sharing.model_bytes
            for t in (*current.module.parameters(), *current.module.buffers()):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return {"resident": sum(seen.values()), "separate": separate}

    def stats(self) -> dict[str, Any]:
        """Loaded models, swaps, failed loads, resident memory, queue depth, batch sizes."""
        models = self.models()
        # a heap walk: only for /metrics, never for readiness probes nor listings
        alive = sum(isinstance(o, ServedModel) for o in gc.get_objects())
        return {
            "ok": True,
            "rss_bytes": rss_bytes(),
            "allocator": current_allocator(),
            "models": models,
            "models_alive": alive,
            "queue_depth": self._pending,
            "batch_sizes": dict(self._batch_sizes),
            "split_batches": self._split_batches,
            "shared_trunk_passes": self._shared_trunk_passes,
            "model_loads": self._model_loads,
            "model_bytes": self._model_bytes(),
            "model_cache": {
                "bytes": self.cache.resident_bytes(),
                "budget": self.cache.budget_bytes,
                "parks": self.cache.parks,
                "resident_trunks": self._resident_trunks(),
            },
            "captures": {f"{m} {o}": n for (m, o), n in self.capture.counts.items()}
            if self.capture
            else {},
            "confidence": {f"{m} {c}": n for (m, c), n in self.capture.confidence.items()}
            if self.capture
            else {},
            "drift": self.drift.snapshot() if self.drift else {},
            "stage_cache": {
                "bytes": self.registry.cache.size,
                "memory": self.registry.cache.hits,
                "store": self.registry.cache.misses,
            },
        }


def build_model_host(
    settings: RefitSettings,
    models: Registry,
    *,
    submit: Callable[[Item], Awaitable[Answer]] | None = None,
) -> ModelHost:
    """The models one serving process runs, from the settings: its capture tap and drift
    monitor write through ``models``' store (no request-path timeouts: they write on their
    own threads). The Serve edge passes ``submit`` (its ``@serve.batch``)."""
    return ModelHost(
        settings.serve,
        models,
        submit=submit,
        capture=capture_tap(settings, models.store),
        drift=drift_monitor(settings, models.store),
    )


def capture_tap(settings: RefitSettings, store: ObjectStore) -> CaptureTap:
    """The capture writer of one serving process (``store``: one without the request-path
    timeouts: its writes run on the tap's own thread)."""
    c = settings.capture
    return CaptureTap(
        Captures(store),
        c.policy(),
        queue_size=c.queue_size,
        refresh_s=c.refresh_s,
        low_confidence_below=c.low_confidence_metric_below,
    )


def drift_monitor(settings: RefitSettings, store: ObjectStore) -> DriftMonitor:
    """The drift score of one serving process (``store``: one without the request-path
    timeouts: its writes run on the monitor's own thread)."""
    d = settings.drift
    return DriftMonitor(
        DriftScores(store),
        sample_rate=d.sample_rate,
        queue_size=d.queue_size,
        window=d.window,
        flush_s=d.flush_s,
    )
