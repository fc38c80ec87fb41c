"""The Ray Serve deployment: the only module that touches ``ray.serve``. A thin edge that
wires the Ray-free data plane (``service.dataplane``) to replicas.

One deployment, ``Classifier``, is the whole HTTP API (``@serve.ingress`` over
:func:`service.api.create_app`): Serve's proxy hands each request to a replica that
validates, decodes, batches and runs the model in the same process, so a prediction crosses
one Ray hop, not two. In each replica:

* a :class:`~service.runtime.model_host.ModelHost` decodes (off the event loop, each
  batch's images just before its forward pass) and runs the forward lane, which merges the
  requests that queue behind a running forward pass; ``@serve.batch`` forms batches before
  it only where a wait window is set;
* ``@serve.multiplexed`` holds the followers (an LRU per replica, by model name; a gateway
  that sets ``serve_multiplexed_model_id`` routes to a replica holding the model);
* registry notices (a publish or an alias move) reach the followers at once;
* admission control answers past the replica's limit with a JSON 503 and ``Retry-After``;
* admin and job routes are served by the same app (jobs go to the job runner actor).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve import Application

from service import haproxy_guard
from service.allocator import without_preloaded_allocator
from service.api import create_app
from service.body_limits import BodyLimits
from service.control.notices import events_actor, notify_async
from service.control.runner_clients import RunnerScheduler
from service.dataplane.dataplane import build_dataplane
from service.dataplane.store_calls import store_call
from service.ports import listen_port
from service.runtime.hotload import Follower
from service.runtime.model_host import Answer, Item, build_model_host
from service.runtime.served_model import GRAPH_MODES
from service.settings import RefitSettings
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore
from training.storage.stage_files import process_stage_cache

log = logging.getLogger("refit.serve")

MULTIPLEX_TOUCH_S = 1.0
"""How often a model in use goes through Serve's multiplex wrapper (which marks it recently
used in the replica's LRU); in between, requests take the follower the wrapper loaded
directly. The wrapper records a Ray metric on every call: 3-4 % of a replica's CPU at 32
concurrent predicts."""

ROOM_FOR_OTHER_ROUTES = 32
"""Requests per replica beyond the predictions it admits: probes, metrics, admin and job
routes still get in while predictions are at their limit."""


class _LaneWarningFilter(logging.Filter):
    """Drops Serve's warning that ``max_batch_size * max_concurrent_batches`` exceeds
    ``max_ongoing_requests``: the classifier admits as many batches as it has requests on
    purpose (they merge in the lane), so the warning's advice does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in str(record.msg)


class ReplicaPredictor:
    """The data plane's predictor in a replica: this replica's :class:`ModelHost`, its
    followers held by Serve's multiplexing."""

    def __init__(self, replica: Classifier) -> None:
        self.replica = replica

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Classify encoded images here."""
        host = self.replica.host
        return await host.predict(await self.replica.follower(model), images, top_k)

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify a preprocessed batch here."""
        host = self.replica.host
        return await host.predict_tensor(await self.replica.follower(model), x, top_k)

    async def predict_many(
        self, models: list[str], images: list[bytes], top_k: int
    ) -> list[dict[str, Any]]:
        """The same images, every model here at once."""
        followers = [await self.replica.follower(m) for m in models]
        return await self.replica.host.predict_many(followers, images, top_k)

    async def ready(self) -> bool:
        """Whether this replica can serve: a model loaded, or the store answering."""
        return await store_call(self.replica.host.ready)

    async def stats(self) -> dict[str, Any]:
        """This replica's loaded models, swaps, failed loads and resident memory."""
        return self.replica.host.stats()

    async def models(self) -> dict[str, dict[str, Any]]:
        """This replica's loaded models: version, numeric mode and why."""
        return self.replica.host.models()


@serve.deployment
@serve.ingress()
class Classifier:
    """The Refit HTTP API in front of batched, multiplexed, hot-loading classification."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        s = settings.serve
        # application() resolved classifier_cpus: as many threads as this replica reserved
        torch.set_num_threads(s.torch_threads)
        # hot-loads and imports: large objects;
        # stages shared with a version loaded before come from memory
        cache = process_stage_cache(settings.serve.stage_cache_mb)
        models = Registry(ObjectStore(settings.s3), cache=cache)
        # Without a wait window Serve's batcher adds only its queue, tasks and futures to
        # every request (the lane merges whatever queues behind a running forward pass in any
        # case): requests go to the lane directly. With one, Serve forms the batches.
        waits = s.batch_wait_timeout_s > 0
        self.host = build_model_host(settings, models, submit=self._submit if waits else None)
        if waits:
            logging.getLogger("ray.serve").addFilter(_LaneWarningFilter())
            # Serve forms the batches; the lane merges those that queue behind a running
            # forward pass. Every batch must reach the lane at once (one request is the
            # smallest batch, so max_ongoing_requests batches is enough): Serve's own
            # semaphore would hold them back, formed and small, instead.
            self._batched = serve.batch(
                max_batch_size=s.max_batch_size,
                batch_wait_timeout_s=s.batch_wait_timeout_s,
                max_concurrent_batches=s.max_ongoing_requests,
            )(self.host.lane.submit)

        async def load(model: str) -> Follower:
            return await self.host.load_follower(model)

        # per replica, so the builder's models_per_replica override takes effect
        self._follower = serve.multiplexed(max_num_models_per_replica=s.models_per_replica)(load)
        self._touched: dict[str, float] = {}  # model -> when it last went through the wrapper
        self._listener: asyncio.Task[None] | None = None

        async def notify(model: str) -> None:
            await notify_async(settings, model)

        self._dataplane = build_dataplane(
            settings,
            predictor=ReplicaPredictor(self),
            scheduler=RunnerScheduler(settings),
            bulk=models,
            notify=notify,
        )
        if s.start_job_runner:  # now: queued jobs resume without waiting for a request
            try:
                RunnerScheduler(settings).runner()
            except Exception as exc:
                log.warning("job runner not started yet: %s", exc)

    def __serve_build_asgi_app__(self) -> Any:
        # Late-bound app: built in the replica after __init__, so it gets this replica's
        # data plane and settings (a module-level app would be a pickled copy without them).
        return create_app(self.settings, self._dataplane)

    async def _submit(self, item: Item) -> Answer:
        answer: Answer = await self._batched(item)
        return answer

    async def follower(self, model: str) -> Follower:
        """This replica's follower of ``model`` (loaded on first use, LRU by Serve). A model
        that went through Serve's wrapper less than ``MULTIPLEX_TOUCH_S`` ago and still
        follows its alias is taken from the host: Serve's LRU order then lags by at most that
        long; a model Serve evicted (or the host parked) stops following and goes through
        the wrapper again."""
        now = time.monotonic()
        known = self.host.followers.get(model)
        if (
            known is not None
            and known.following
            and now - self._touched.get(model, float("-inf")) < MULTIPLEX_TOUCH_S
        ):
            return known
        follower: Follower = await self._follower(model)
        if len(self._touched) > 2 * self.settings.serve.models_per_replica:
            # names of evicted models; every key was a model that loaded
            self._touched = {m: t for m, t in self._touched.items() if m in self.host.followers}
        self._touched[model] = now
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        return follower

    async def _listen(self) -> None:
        """Follow pushed registry notices: a publish or promote reaches this replica at once
        (the alias poll stays as the fallback)."""
        seen: dict[str, int] = {}
        while True:
            names = list(self.host.followers.keys())
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
                    await self.host.refresh(name)


def application(settings: RefitSettings) -> Application:
    """The Serve application (one deployment, the API and the model) with options from
    settings."""
    # resolve the replicas' CPUs here, where the app is built: every replica then runs as
    # many threads as it reserved, wherever it lands
    s = settings.serve.model_copy(update={"classifier_cpus": settings.serve.replica_cpus})
    settings = settings.model_copy(update={"serve": s})
    # @serve.deployment turns the class into a Deployment; the stubs still see a class.
    classifier_dep: Any = Classifier
    spread = (
        {}
        if s.max_replicas_per_node is None
        else {"max_replicas_per_node": s.max_replicas_per_node}
    )
    replicas = s.classifier_replicas
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if s.classifier_max_replicas is not None:  # Serve scales on ongoing requests
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "initial_replicas": replicas,
                "max_replicas": max(replicas, s.classifier_max_replicas),
                "target_ongoing_requests": s.target_ongoing_requests,
                "upscale_delay_s": s.upscale_delay_s,
                "downscale_delay_s": s.downscale_delay_s,
            }
        }
    # The replica's own admission control refuses predictions past its limit with our JSON
    # 503 and Retry-After; Serve's limits sit above it (with room for probes and admin), so
    # its plain-text 503 never answers instead. Requests wait at the proxy only while the
    # router assigns them (bursts), never for work.
    admitted = s.max_ongoing_requests + max(0, s.max_queued_requests)
    env = serve_env(settings)
    if s.numeric_mode in (*GRAPH_MODES, "auto"):  # OpenVINO aborts under a preloaded jemalloc
        env |= without_preloaded_allocator()
    actor: dict[str, Any] = {"num_cpus": s.replica_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    return classifier_dep.options(
        **spread,
        **scaling,
        max_ongoing_requests=admitted + ROOM_FOR_OTHER_ROUTES,
        max_queued_requests=-1 if s.max_queued_requests < 0 else max(1024, 4 * admitted),
        ray_actor_options=actor,
    ).bind(settings)


def serve_env(settings: RefitSettings) -> dict[str, str]:
    """Ray Serve's switches that every Serve process reads at its start (the controller and
    the replicas): which ingress answers HTTP (``serve.ingress``)."""
    s = settings.serve
    if s.ingress != "haproxy":
        return {}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{s.ingress_drain_s:g}",
    }


def controller_env(settings: RefitSettings) -> dict[str, str]:
    """Environment of the Serve controller (and of the proxies it starts): how soon a dead
    HTTP proxy is noticed and replaced, and the ingress (:func:`serve_env`).

    With HAProxy, its side ports (a read-only stats page and a Prometheus exporter; Serve's
    fallback proxy on ``host``) are chosen free here: Ray's fixed defaults (8404, 9101, 8500)
    collide when two clusters share a host. HAProxy's files are already per Ray node
    (``/tmp/haproxy-serve/{node_id}``). Ray starts HAProxy through ``refit-haproxy``
    (:mod:`service.haproxy_guard`), which binds the side ports to ``ingress_stats_host`` and
    closes the admin socket to other users."""
    s = settings.serve
    env = {"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": f"{s.proxy_health_check_period_s:g}"}
    env |= serve_env(settings)
    if s.ingress == "haproxy":
        env |= {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(listen_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(listen_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(listen_port()),
            "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy_guard_path(),
            haproxy_guard.SIDE_HOST_ENV: s.ingress_stats_host,
            haproxy_guard.BODY_LIMITS_ENV: BodyLimits.of(s).to_json(),
        }
    return env


def haproxy_guard_path() -> str:
    """The ``refit-haproxy`` program installed beside this Python (``pip install`` puts
    console scripts there). FileNotFoundError when it is missing: HAProxy is never started
    with Ray's side doors open instead."""
    path = Path(sys.executable).with_name("refit-haproxy")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"{path} is missing: install Refit (pip install -e .), or serve with "
            "REFIT_SERVE__INGRESS=proxy"
        )
    return str(path)


def run(settings: RefitSettings, *, name: str = "refit") -> dict[str, str]:
    """Deploy on the connected Ray: HTTP on ``settings.serve.host:port``, app at ``/``.
    Returns the Serve controller's environment (:func:`controller_env`)."""
    # the controller's environment is set when it is created (here, or never: an already
    # running controller keeps its own); the replicas get theirs from the deployment
    env = controller_env(settings)
    serve.start(
        http_options={"host": settings.serve.host, "port": settings.serve.port},
        controller_options={"runtime_env": {"env_vars": env}},
    )
    serve.run(application(settings), name=name, route_prefix="/")
    return env


def shutdown() -> None:
    """Tear Serve down (tests, ``refit up`` on exit)."""
    serve.shutdown()
