"""The HTTP API: the only package that touches FastAPI.

Routes by resource: ``predict_v1`` (v1 predict), ``inference_v2`` (Open Inference Protocol
v2), ``model_admin`` (listing, promote, rollback), ``finetune_jobs``, ``ops`` (probes,
metrics); ``auth`` (bearer scopes as dependencies), ``errors`` (the one error table),
``middleware`` (body caps, request metrics), ``params`` (typed path parameters).
"""

from service.api.app import create_app

__all__ = ["create_app"]
