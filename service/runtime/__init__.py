"""What runs inside a serving replica, with no Ray and no FastAPI in it.

* ``model_host``: :class:`ModelHost`, the models one process serves (decode, lane, a
  forward per version), and :func:`build_model_host`;
* ``hotload``: slot, follower (alias version + manifest sha256), swap; ``served_model``:
  loading a version, numeric modes and their agreement gate; ``shared_stages``: leading
  stages of the same content held once in memory; ``model_cache``: which models keep their
  version loaded (the byte budget);
* ``batching``: the forward lane; ``images``: bounded request decoding;
* ``drift``: the drift score of served inputs; ``capture_tap``: the capture tap (sampling and
  a bounded queue, off the request path).

It imports no use case (``dataplane``), route (``api``) or control plane.
"""

from service.runtime.model_host import ModelHost, build_model_host

__all__ = ["ModelHost", "build_model_host"]
