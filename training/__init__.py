"""Refit's training library: fine-tune a torchvision backbone on labelled images and publish
the result to the model registry. No web or serving code lives here (``service`` imports
``training``, never the reverse); import the modules themselves.

==============================  =======================================================
``storage``                     the storage contract shared with the service (its own
                                package: object store, registry, records, ids, errors)
``spec``                        the validated fine-tune request (:class:`FinetuneSpec`)
``freeze_spec``, ``freeze``     frozen-layer policies as data; their plan, applied
``preprocessing_spec``          a model's preprocessing and augmentation, as data
``preprocess``                  the torchvision transforms that apply them
``backbones``, ``tv``           torchvision builders by name, stages per family; the one
                                torchvision import
``weights``                     base weights: torchvision enums, safetensors, versions
``data``                        dataset indexing, splits, streaming and decoding
``image_cache``                 image bytes on the node's disk between jobs, by ETag
``run_context``, ``run_data``   what a run is given; what one worker trains on
``loop``, ``worker``            ``train_one_epoch``/``evaluate``; one worker's whole run
``checkpoints``, ``progress``   checkpoint files; a job's progress records
``local_fit``                   a one-worker CPU run in the job's own process
``ray_train``                   the Ray Train edge (:func:`fit`, :func:`ensure_ray`)
``feature_store``               head-only features per trunk content and image sha256
``feature_stats``               a version's feature statistics (the drift reference)
``served_scores``               a version's logits on images, kept by content (scoring the
                                serving version on new images only)
``scoring``, ``gate``           scoring on validation splits; the publish gate
``classification_metrics``      loss, top-1/5, per-class P/R/F1 from a confusion matrix
``version_crops``               the validation crops a version is published with
``stage_digests``               the sha256 of each stage's tensors (content identity)
``openvino_ir``                 OpenVINO and INT8 graphs (the one openvino/nncf module)
``retrain_dataset``             a retrain policy's dataset: base plus feedback
``finetune``                    the job pipeline: train, score, gate, publish
``job_settings``                the ``ray`` and ``training`` settings sections
``node_jobs``                   jobs on their critical path on this node; background
                                work (graph exports, mode changes) that waits for them
``demo``                        the offline digits demo: datasets and jobs
==============================  =======================================================
"""
