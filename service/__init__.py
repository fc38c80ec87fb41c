"""Refit's application: the HTTP API and its Ray Serve deployments, the job control plane,
the CLI. It imports ``training``, never the reverse.

=======================  ==============================================================
``api``                  the FastAPI app (the only FastAPI code)
``dataplane``            the API's use cases, Ray-free: predict, registry, jobs, hot-load
``deployments``          the Ray Serve edge (the only ``ray.serve`` code); ``app``: builder
``control``              the job runner, RayJob launcher, registry notices, local jobs
``settings``             the one settings object (``REFIT_*``), composed of the sections
``request_errors``       the errors a request can cause (extending ``training.storage``'s)
``metrics``              Prometheus families read from replicas and the job runner
``cli``, ``client``      ``refit`` and its HTTP client; ``embedded_store``: SeaweedFS
=======================  ==============================================================
"""
