"""The HTTP API: the only package that touches FastAPI.

* ``route_table``: :func:`create_app`, the routers over one data plane;
* routes by resource: ``predict_v1`` (v1 predict), ``inference_v2`` (Open Inference
  Protocol v2), ``model_admin`` (listing, promote, rollback), ``finetune_jobs``, ``ops``
  (probes, metrics);
* ``auth`` (bearer scopes as dependencies), ``error_table`` (the one error table),
  ``middleware`` (body caps, request metrics), ``params`` (typed path parameters).
"""

from service.api.route_table import create_app

__all__ = ["create_app"]
