"""The Ray Serve deployments: the only module that touches ``ray.serve``. A thin edge that
wires the Ray-free data plane (``service.dataplane``) to replicas.

* ``Classifier`` runs a :class:`~service.dataplane.model_host.ModelHost`: Serve's
  ``@serve.multiplexed`` holds the followers (an LRU per replica, routed by model id) and
  ``@serve.batch`` forms the batches that the host's forward lane merges. Both are built per
  replica in ``__init__``, from the settings the replica was given (never read at import).
  Registry notices (a publish or an alias move) reach the followers at once.
* ``Ingress`` is :func:`service.api.create_app` over a :class:`DataPlane` whose predictor
  calls the classifier through its handle, and whose jobs go to the job runner actor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.api import create_app
from service.control.notices import events_actor, notify_async
from service.control.runner_clients import RunnerScheduler
from service.dataplane.dataplane import DataPlane
from service.dataplane.hotload import Follower
from service.dataplane.jobs import JobsUseCases
from service.dataplane.model_host import Item, ModelHost, Ranked
from service.request_errors import OverloadedError, unwrap_remote
from service.settings import RefitSettings
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore

log = logging.getLogger("refit.serve")


class _LaneWarningFilter(logging.Filter):
    """Drops Serve's warning that ``max_batch_size * max_concurrent_batches`` exceeds
    ``max_ongoing_requests``: the classifier admits as many batches as it has requests on
    purpose (they merge in the lane), so the warning's advice does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in str(record.msg)


@serve.deployment
class Classifier:
    """Batched, multiplexed image classification with hot-loading."""

    def __init__(self, settings: RefitSettings) -> None:
        self.settings = settings
        s = settings.serve
        torch.set_num_threads(max(1, int(s.classifier_cpus)))
        self.host = ModelHost(s, Registry(ObjectStore(settings.s3)), submit=self._submit)
        logging.getLogger("ray.serve").addFilter(_LaneWarningFilter())
        # Serve forms the batches; the lane merges those that queue behind a running forward
        # pass. Every batch must reach the lane at once (one request is the smallest batch,
        # so max_ongoing_requests batches is enough): Serve's own semaphore would hold them
        # back, formed and small, instead.
        self._batched = serve.batch(
            max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s,
            max_concurrent_batches=s.max_ongoing_requests,
        )(self.host.lane.submit)

        async def load(model: str) -> Follower:
            return await self.host.load_follower(model)

        # per replica, so the builder's models_per_replica override takes effect
        self._follower = serve.multiplexed(max_num_models_per_replica=s.models_per_replica)(load)
        self._listener: asyncio.Task[None] | None = None

    async def _submit(self, item: Item) -> Ranked:
        ranked: Ranked = await self._batched(item)
        return ranked

    async def _current(self) -> Follower:
        follower: Follower = await self._follower(serve.get_multiplexed_model_id())
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

    async def predict(self, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Decode for the current version, then classify in a dynamic batch."""
        return await self.host.predict(await self._current(), images, top_k)

    async def predict_tensor(self, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify an already preprocessed float32 batch ``[N, 3, crop, crop]``."""
        return await self.host.predict_tensor(await self._current(), x, top_k)

    async def ready(self) -> bool:
        """Whether this replica can serve: a model loaded, or the store answering (kept
        cheap, unlike :meth:`stats`, which walks the heap to count live models)."""
        return await asyncio.to_thread(self.host.ready)

    def stats(self) -> dict[str, Any]:
        """This replica's loaded models, swaps, failed loads and resident memory."""
        return self.host.stats()


class ClassifierPredictor:
    """The data plane's predictor in the ingress: calls the classifier replicas, routed by
    model id; their errors come back as ours."""

    def __init__(self, classifier: DeploymentHandle) -> None:
        self.classifier = classifier

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        """Classify encoded images on a replica that holds ``model``."""
        return await self._call(model, "predict", images, top_k)

    async def predict_tensor(self, model: str, x: torch.Tensor, top_k: int) -> dict[str, Any]:
        """Classify a preprocessed batch on a replica that holds ``model``."""
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
        except (RayTaskError, RayActorError) as exc:  # our errors; a replica that died
            raise unwrap_remote(exc) from None

    async def ready(self) -> bool:
        """Whether a classifier replica answers."""
        return bool(await self.classifier.ready.remote())

    async def stats(self) -> dict[str, Any]:
        """One replica's statistics."""
        result: dict[str, Any] = await self.classifier.stats.remote()
        return result


def serving_dataplane(classifier: DeploymentHandle, settings: RefitSettings) -> DataPlane:
    """The data plane of an ingress replica (its store calls use the request-path
    timeouts)."""
    store = ObjectStore(settings.s3, request_path=True)

    async def notify(model: str) -> None:
        await notify_async(settings, model)

    return DataPlane(
        registry=Registry(store),
        predictor=ClassifierPredictor(classifier),
        jobs=JobsUseCases(store, RunnerScheduler(settings)),
        alias=settings.serve.alias,
        notify=notify,
    )


@serve.deployment
@serve.ingress()
class Ingress:
    """FastAPI ingress: validation, auth, errors and metrics in front of the classifier."""

    def __init__(self, classifier: DeploymentHandle, settings: RefitSettings) -> None:
        self._settings = settings
        self._dataplane = serving_dataplane(classifier, settings)
        try:  # start the job runner now: queued jobs resume without waiting for a request
            RunnerScheduler(settings).runner()
        except Exception as exc:
            log.warning("job runner not started yet: %s", exc)

    def __serve_build_asgi_app__(self) -> Any:
        # Late-bound app: built in the replica after __init__, so it gets this replica's
        # data plane and settings (a module-level app would be a pickled copy without them).
        return create_app(self._settings, self._dataplane)


def application(settings: RefitSettings) -> Any:
    """The Serve application graph (ingress -> classifier) with options from settings."""
    s = settings.serve
    # @serve.deployment turns the classes into Deployments; the stubs still see classes.
    classifier_dep: Any = Classifier
    ingress_dep: Any = Ingress
    spread = (
        {}
        if s.max_replicas_per_node is None
        else {"max_replicas_per_node": s.max_replicas_per_node}
    )
    most = max(s.classifier_replicas, s.classifier_max_replicas or 0)
    scaling: dict[str, Any] = {"num_replicas": s.classifier_replicas}
    if s.classifier_max_replicas is not None:  # Serve scales on ongoing requests
        scaling = {
            "autoscaling_config": {
                "min_replicas": s.classifier_replicas,
                "initial_replicas": s.classifier_replicas,
                "max_replicas": most,
                "target_ongoing_requests": s.target_ongoing_requests,
                "upscale_delay_s": s.upscale_delay_s,
                "downscale_delay_s": s.downscale_delay_s,
            }
        }
    classifier = classifier_dep.options(
        **spread,
        **scaling,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.classifier_cpus},
    ).bind(settings)
    # The ingress only awaits: give it room for twice what the classifiers can hold, so the
    # classifier's queue sheds load first - with our JSON 503 and Retry-After - and the
    # proxy's plain-text 503 never does.
    held = (s.max_ongoing_requests + max(0, s.max_queued_requests)) * most
    return ingress_dep.options(
        **spread,
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=max(64, 2 * s.max_batch_size, -(-2 * held // s.ingress_replicas)),
        # requests wait here only while the router assigns them (bursts), never for work
        max_queued_requests=max(1024, 4 * held),
        ray_actor_options={"num_cpus": s.ingress_cpus},
    ).bind(classifier, settings)


def controller_env(settings: RefitSettings) -> dict[str, str]:
    """Environment of the Serve controller (Ray reads it there at start): how soon a dead
    HTTP proxy is noticed and replaced."""
    return {
        "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": f"{settings.serve.proxy_health_check_period_s:g}"
    }


def run(settings: RefitSettings, *, name: str = "refit") -> None:
    """Deploy on the connected Ray: HTTP on ``settings.serve.host:port``, app at ``/``."""
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(application(settings), name=name, route_prefix="/")


def shutdown() -> None:
    """Tear Serve down (tests, ``refit up`` on exit)."""
    serve.shutdown()
