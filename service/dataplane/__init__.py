"""The data plane: the use cases of the HTTP API with no Ray and no FastAPI in them.

* ``dataplane``: :class:`DataPlane` (predict, list, metadata, promote, rollback) and the
  :class:`Predictor` it runs models through;
* ``model_host``: the models one process serves (decode, batch, forward per version);
* ``hotload``: slot, follower and swap; ``served_model``: loading, numeric modes;
* ``batching``: the forward lane; ``images``: bounded request decoding;
* ``oip_codec``: Open Inference Protocol v2 tensors; ``jobs``: fine-tune job use cases;
  ``curve``: the training-curve PNG.
"""

from service.dataplane.dataplane import (
    DataPlane,
    InProcessPredictor,
    Predictor,
    in_process_dataplane,
)
from service.dataplane.jobs import JobsUseCases, Scheduler
from service.dataplane.model_host import ModelHost

__all__ = [
    "DataPlane",
    "InProcessPredictor",
    "JobsUseCases",
    "ModelHost",
    "Predictor",
    "Scheduler",
    "in_process_dataplane",
]
