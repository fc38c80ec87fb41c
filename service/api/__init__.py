"""The HTTP API: the only package that touches FastAPI.

* ``route_table``: :func:`create_app`, the routers over one data plane;
* routes by resource: ``predict_v1`` (v1 predict), ``fan_out`` (the same images to several
  models at once), ``inference_v2`` (Open Inference
  Protocol v2; ``oip_codec`` parses and builds its tensors), ``model_admin`` (listing,
  import, promote, rollback), ``jobs``, ``captures``, ``feedback``, ``quality``,
  ``retrain_policies``, ``ops`` (probes, metrics);
* ``auth`` (bearer scopes as dependencies), ``error_table`` (the one error table),
  ``middleware`` (header and body caps, request metrics), ``params`` (typed path
  parameters and the data plane dependency).
"""

from service.api.route_table import create_app

__all__ = ["create_app"]
