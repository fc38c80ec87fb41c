"""Scoring a model on a validation split: over all of it, and per source of a retrain
dataset (base, feedback), in one pass (the parts' sums make the whole)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.classification_metrics import MetricAccumulator
from training.data import Sample, make_loader
from training.feature_stats import collect_outputs
from training.job_settings import TrainingSettings
from training.loop import Precision, evaluate
from training.preprocess import eval_transform
from training.preprocessing_spec import Preprocessing
from training.storage.s3 import ObjectStore
from training.version_crops import capped_dataset


def evaluate_model(
    model: nn.Module,
    samples: list[Sample],
    *,
    store: ObjectStore,
    preprocessing: Preprocessing,
    classes: list[str],
    training: TrainingSettings,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Metrics of a model on samples (plain torch, in this process, CPU)."""
    return _accumulate(model, samples, store, preprocessing, classes, training, batch_size).compute(
        classes
    )


def outputs_on(
    model: nn.Module,
    backbone: str,
    samples: list[Sample],
    *,
    store: ObjectStore,
    preprocessing: Preprocessing,
    classes: list[str],
    training: TrainingSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of ``model`` on ``samples``, in their order, from one pass:
    the head's input (penultimate features) and its output."""
    with collect_outputs(model, backbone) as seen:
        evaluate_model(
            model,
            samples,
            store=store,
            preprocessing=preprocessing,
            classes=classes,
            training=training,
        )
    if not seen:
        return torch.empty(0), torch.empty(0)
    return torch.cat([f for f, _ in seen]), torch.cat([o for _, o in seen])


def _accumulate(
    model: nn.Module,
    samples: list[Sample],
    store: ObjectStore,
    preprocessing: Preprocessing,
    classes: list[str],
    training: TrainingSettings,
    batch_size: int = 64,
) -> MetricAccumulator:
    ds = capped_dataset(store, samples, eval_transform(preprocessing), training)
    loader = make_loader(ds, batch_size=batch_size, shuffle=False)
    return evaluate(
        model, loader, num_classes=len(classes), precision=Precision(torch.device("cpu"))
    )


def parts_of(samples: list[Sample]) -> dict[str, list[Sample]]:
    """A split by source (``base``, ``feedback``) for a retrain dataset; ``{"": all}``
    otherwise."""
    parts: dict[str, list[Sample]] = {}
    for s in samples:
        parts.setdefault(s.source, []).append(s)
    return dict(sorted(parts.items())) if parts else {"": []}


@dataclass
class Scores:
    """A model on the validation split: over all of it and per source."""

    all: dict[str, Any]
    parts: dict[str, dict[str, Any]]


def score_parts(
    model: nn.Module,
    samples: list[Sample],
    store: ObjectStore,
    preprocessing: Preprocessing,
    classes: list[str],
    training: TrainingSettings,
) -> Scores:
    """Metrics over all samples and per source (see :func:`parts_of`)."""
    parts = {
        name: _accumulate(model, part, store, preprocessing, classes, training)
        for name, part in parts_of(samples).items()
    }
    return _merged(parts, classes)


def score_features(
    head: nn.Module, samples: list[Sample], features: dict[str, torch.Tensor], classes: list[str]
) -> Scores:
    """:func:`score_parts` from the samples' stored penultimate features (by key): the head
    alone runs. Equal to scoring the whole model on the images when the features came from
    its trunk (a head-only candidate, or a serving version with the same trunk)."""
    cpu = Precision(torch.device("cpu"))
    parts = {}
    for name, part in parts_of(samples).items():
        x = torch.stack([features[s.key] for s in part]) if part else torch.empty(0, 1)
        y = torch.tensor([s.label for s in part], dtype=torch.long)
        loader = DataLoader(TensorDataset(x, y), batch_size=256)
        parts[name] = evaluate(head, loader, num_classes=len(classes), precision=cpu)
    return _merged(parts, classes)


def score_logits(samples: list[Sample], logits: torch.Tensor, classes: list[str]) -> Scores:
    """:func:`score_parts` from the model's logits on the samples (in their order), kept
    from a pass that already ran (the best epoch's validation)."""
    index = {id(s): n for n, s in enumerate(samples)}
    criterion = nn.CrossEntropyLoss(reduction="sum")
    parts = {}
    for name, part in parts_of(samples).items():
        acc = MetricAccumulator(len(classes))
        if part:
            rows = logits[[index[id(s)] for s in part]].float()
            y = torch.tensor([s.label for s in part], dtype=torch.long)
            acc.update(rows, y, float(criterion(rows, y)))
        parts[name] = acc
    return _merged(parts, classes)


def _merged(parts: dict[str, MetricAccumulator], classes: list[str]) -> Scores:
    total = MetricAccumulator(len(classes))
    for acc in parts.values():
        total = total.merge(acc)
    return Scores(
        all=total.compute(classes), parts={n: acc.compute(classes) for n, acc in parts.items()}
    )
