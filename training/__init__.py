"""Refit's training library: fine-tune a torchvision backbone on labelled images and publish
the result to the model registry. No web or serving code lives here (``service`` imports
``training``, never the reverse).

=======================  ==============================================================
``training.storage``     the storage contract shared with the service: object store,
                         registry, job records, ids, errors, the ``s3`` settings section
``spec``                 the validated fine-tune request (:class:`FinetuneSpec`)
``freeze``               frozen-layer policies, parameter groups, frozen BatchNorm
``backbones``, ``tv``    torchvision builders by name, stages per family
``weights``              base weights: torchvision enums, safetensors URIs, published versions
``data``, ``preprocess``  dataset indexing and decoding, transforms
``loop``                 ``train_one_epoch`` / ``evaluate`` (plain torch)
``worker``               one worker's whole run (:func:`run_worker`), Ray-free
``ray_train``            the Ray Train edge (:func:`fit`, :func:`ensure_ray`)
``finetune``             the job pipeline: train, score, gate, publish (:func:`run_finetune`)
``job_settings``         the ``ray`` and ``training`` settings sections
=======================  ==============================================================

The names below load their module on first use, so ``import training`` stays cheap (Ray and
torchvision are imported only by the code that needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "FinetuneSpec": "training.spec",
    "parse_spec": "training.spec",
    "RaySettings": "training.job_settings",
    "TrainingSettings": "training.job_settings",
    "build_backbone": "training.backbones",
    "run_worker": "training.worker",
    "RunInputs": "training.run_context",
    "RunContext": "training.run_context",
    "ensure_ray": "training.ray_train",
    "fit": "training.ray_train",
    "run_finetune": "training.finetune",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
