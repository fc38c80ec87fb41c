"""Classification metrics from a confusion matrix: loss, top-1, top-5, per-class P/R/F1."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class MetricAccumulator:
    """Accumulates logits/targets batch by batch; sums across DDP ranks on demand."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.totals = torch.zeros(3, dtype=torch.float64)  # loss_sum, count, top5_correct

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> None:
        """Add one batch (``loss_sum`` is the *sum* of per-sample losses)."""
        logits, targets = logits.detach().float().cpu(), targets.cpu()
        pred = logits.argmax(dim=1)
        idx = targets * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )
        k = min(5, self.num_classes)
        top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        self.totals += torch.tensor([loss_sum, float(targets.numel()), float(top5)])

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """A new accumulator over both (scores of parts of one split, summed)."""
        out = MetricAccumulator(self.num_classes)
        out.confusion = self.confusion + other.confusion
        out.totals = self.totals + other.totals
        return out

    def all_reduce(self) -> None:
        """Sum over all ranks when running under torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.confusion, self.totals):
                dist.all_reduce(t)

    def compute(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Metrics as plain floats/lists (JSON-ready)."""
        cm = self.confusion
        count = float(self.totals[1])
        tp = cm.diag()
        support, predicted = cm.sum(dim=1), cm.sum(dim=0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
        recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
        f1 = torch.where(
            precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(1e-12), 0.0
        )
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "loss": float(self.totals[0]) / count if count else float("nan"),
            "top1": float(tp.sum()) / count if count else 0.0,
            "top5": float(self.totals[2]) / count if count else 0.0,
            "images": int(count),
            "macro_f1": float(f1.mean()),
            "per_class": {
                n: {
                    "precision": round(float(p), 6),
                    "recall": round(float(r), 6),
                    "f1": round(float(f), 6),
                    "support": int(s),
                }
                for n, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
            },
            "confusion": cm.long().tolist(),
        }
