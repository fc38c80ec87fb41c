"""The publish gate: a candidate must be good enough and not worse than what serves now."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class SourceScore(BaseModel):
    """Both versions on one part of a retrain dataset's validation split."""

    images: int
    candidate_top1: float
    incumbent_top1: float | None = None
    passed: bool = True


class ClassDrop(BaseModel):
    """A class the candidate recognises worse than the serving version by more than
    ``max_regression``: forgetting, reported per class."""

    source: str
    label: str
    images: int
    incumbent: float
    candidate: float


class GateDecision(BaseModel):
    """The decision and every reason for it (recorded in the job result and the manifest)."""

    passed: bool
    reasons: list[str]
    candidate_top1: float
    incumbent_version: str | None = None
    incumbent_top1: float | None = None
    min_accuracy: float
    max_regression: float
    sources: dict[str, SourceScore] = Field(default_factory=dict)
    """Per part of a retrain dataset (``base``, ``feedback``): each must be within
    ``max_regression`` of the serving version on its own."""
    forgetting: list[ClassDrop] = Field(default_factory=list)


def class_drops(
    source: str,
    candidate: dict[str, dict[str, Any]],
    incumbent: dict[str, dict[str, Any]],
    max_regression: float,
) -> list[ClassDrop]:
    """Classes whose recall fell by more than ``max_regression`` (``per_class`` metrics of
    both versions on the same images)."""
    out = []
    for label, c in candidate.items():
        i = incumbent.get(label)
        if i is None or not c["support"]:
            continue
        if c["recall"] + 1e-12 < i["recall"] - max_regression:
            out.append(
                ClassDrop(
                    source=source,
                    label=label,
                    images=int(c["support"]),
                    incumbent=i["recall"],
                    candidate=c["recall"],
                )
            )
    return out


def with_sources(
    decision: GateDecision, sources: dict[str, SourceScore], forgetting: list[ClassDrop]
) -> GateDecision:
    """The overall decision, also requiring every source to be within ``max_regression``
    of the serving version; forgetting is listed in the reasons."""
    reasons, passed = list(decision.reasons), decision.passed
    checked = {}
    for name, score in sorted(sources.items()):
        head = f"{name} val ({score.images} images): top1 {score.candidate_top1:.4f}"
        if score.incumbent_top1 is None:
            reasons.append(f"{head}; serving version not compared")
            checked[name] = score
            continue
        ok = score.candidate_top1 + 1e-12 >= score.incumbent_top1 - decision.max_regression
        passed = passed and ok
        how = "within" if ok else "worse by more than"
        reasons.append(
            f"{head} vs serving {score.incumbent_top1:.4f}: {how} max_regression "
            f"{decision.max_regression:.4f}"
        )
        checked[name] = score.model_copy(update={"passed": ok})
    for d in forgetting:
        reasons.append(
            f"forgetting: class {d.label!r} on {d.source} val ({d.images} images) "
            f"{d.incumbent:.3f} -> {d.candidate:.3f}"
        )
    return decision.model_copy(
        update={"passed": passed, "reasons": reasons, "sources": checked, "forgetting": forgetting}
    )


def decide(
    candidate_top1: float,
    *,
    min_accuracy: float,
    max_regression: float,
    incumbent_version: str | None = None,
    incumbent_top1: float | None = None,
    incumbent_note: str | None = None,
) -> GateDecision:
    """Pass iff top-1 >= ``min_accuracy`` and (no comparable incumbent or top-1 >=
    incumbent's - ``max_regression``)."""
    reasons, passed = [], True
    if candidate_top1 + 1e-12 >= min_accuracy:
        reasons.append(f"top1 {candidate_top1:.4f} >= min_accuracy {min_accuracy:.4f}")
    else:
        passed = False
        reasons.append(f"top1 {candidate_top1:.4f} < min_accuracy {min_accuracy:.4f}")
    if incumbent_top1 is None:
        reasons.append(incumbent_note or "no serving model to compare with")
    elif candidate_top1 + 1e-12 >= incumbent_top1 - max_regression:
        reasons.append(
            f"top1 {candidate_top1:.4f} vs serving {incumbent_version} {incumbent_top1:.4f}: "
            f"within max_regression {max_regression:.4f}"
        )
    else:
        passed = False
        reasons.append(
            f"top1 {candidate_top1:.4f} is worse than serving {incumbent_version} "
            f"{incumbent_top1:.4f} by more than max_regression {max_regression:.4f}"
        )
    return GateDecision(
        passed=passed,
        reasons=reasons,
        candidate_top1=candidate_top1,
        incumbent_version=incumbent_version,
        incumbent_top1=incumbent_top1,
        min_accuracy=min_accuracy,
        max_regression=max_regression,
    )
