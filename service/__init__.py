"""Refit's application: the HTTP API and its Ray Serve deployment, the job control plane, the
CLI. It imports ``training``, never the reverse. The layers point one way: ``api`` (routes)
-> ``dataplane`` (use cases) -> ``runtime`` (what runs in a replica).

=========================  ============================================================
``api``                    the FastAPI app (the only FastAPI code) and the OIP v2 codec
``dataplane``              the API's use cases, Ray-free; :func:`build_dataplane`
``runtime``                a replica's models: served versions, hot-load, the lane,
                           decoding, drift, the capture tap; Ray-free
``control``                the job runner and its launchers, registry notices, local jobs
``deployments``            the Ray Serve edge (the only ``ray.serve`` code)
``app``                    the typed Serve app builder (``service.app:build_app``)
``settings``               the one settings object (``REFIT_*``), composed of the sections
``request_errors``         the errors a request can cause (extending ``training.storage``'s)
``body_limits``            request body caps by path, for the app and HAProxy
``haproxy_guard``          ``refit-haproxy``: Ray's HAProxy config with its side doors shut
``metrics``                Prometheus families read from replicas and the job runner
``cli``                    ``refit``: its commands, HTTP client, and ``refit up``'s console
``embedded_store``         the embedded SeaweedFS
``allocator``, ``ports``   jemalloc for ``refit up``; free ports for the servers it starts
=========================  ============================================================
"""
