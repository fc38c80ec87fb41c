"""The publish gate: a candidate must be good enough and not worse than what serves now."""

from __future__ import annotations

from pydantic import BaseModel


class GateDecision(BaseModel):
    """The decision and every reason for it (recorded in the job result and the manifest)."""

    passed: bool
    reasons: list[str]
    candidate_top1: float
    incumbent_version: str | None = None
    incumbent_top1: float | None = None
    min_accuracy: float
    max_regression: float


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
