"""The storage contract that the training library and the service share.

One bucket (and an optional key prefix) holds everything; each key prefix has one owner here:

=====================  ===============================================================
``models/``            ``registry``: versions, manifests, graph sets, aliases;
                       ``stage_files``: a version's weights stage by stage, each stage
                       written once (by the first version with that content)
``jobs/``              ``jobs``: records, progress, step reports, active markers,
                       idempotency claims, a run's placement groups; ``job_lease``: who
                       runs a job
``runs/``              checkpoints of a job's runs (``runs/{job_id}``, named by
                       ``jobs``)
``captures/``          ``captures``: capture policies and captured predictions
``feedback/``          ``feedback``: labels and their images; ``quality_index``: a model's
                       live-quality counters beside them
``policies/``          ``retrain_policies``: retrain policies and the runner's state
``drift/``             ``drift_scores``: each replica's drift window per version
``features/``          ``training.feature_store`` (head-only features, by content)
``datasets/``          read through :meth:`ObjectStore.key_from_uri` (user URIs, allow-listed)
=====================  ===============================================================

``s3``: :class:`ObjectStore`, the only code that talks to boto3, and the one way records are
read and written (:meth:`ObjectStore.get_record`: a byte cap per kind, a self-name check,
damage as :class:`IntegrityError`). ``errors``: the one error hierarchy, each class carrying
its HTTP status. ``ids``: one strict id pattern. ``location``: the ``s3`` settings section.
Import the modules themselves.
"""
