"""The data plane: the use cases of the HTTP API, with no Ray and no FastAPI in them.

* ``dataplane``: :class:`DataPlane` (predict, list, metadata, import, promote, rollback),
  the :class:`Predictor` it runs models through, :func:`build_dataplane` (the one way to
  make one: the Serve edge's and the in-process one);
* ``jobs``: fine-tune jobs through a :class:`Scheduler`; ``model_import``: bring your own
  weights;
* the loop's use cases: ``captures`` (capture admin), ``feedback`` (labels back),
  ``quality`` (live accuracy), ``retrain_policies``;
* ``curve``: the training-curve PNG; ``store_calls``: store calls off the event loop.
"""

from service.dataplane.dataplane import (
    DataPlane,
    InProcessPredictor,
    Predictor,
    build_dataplane,
    in_process_dataplane,
)
from service.dataplane.jobs import JobsUseCases, Scheduler

__all__ = [
    "DataPlane",
    "InProcessPredictor",
    "JobsUseCases",
    "Predictor",
    "Scheduler",
    "build_dataplane",
    "in_process_dataplane",
]
