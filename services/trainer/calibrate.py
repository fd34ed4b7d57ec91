"""Confidence calibration on the holdout (pure).

The student's confidence is the minimum probability of its answer's decisive tokens. Routing serves a student
answer only at or above a threshold and sends the rest to the teacher, so the threshold that matters is the
*lowest* one at which the answers at or above it still agree with the teacher at the target rate: lower keeps
more traffic on the student (coverage), higher only gives coverage away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # None: no threshold reaches the target (the student should serve nothing)
    coverage: float  # share of holdout answers at or above the threshold
    selective_agreement: float  # agreement among those answers (0.0 when none)
    covered: int
    total: int
    target: float


def calibrate_threshold(scored: Sequence[tuple[float, bool]], target: float, min_covered: int = 1) -> Calibration:
    """The lowest confidence threshold t such that the answers with confidence >= t agree at rate >= target.

    ``scored`` holds (confidence, agreed) per holdout answer. Candidate thresholds are the observed
    confidences (any value between two of them selects the same answers). ``min_covered`` refuses thresholds
    kept by fewer answers, so one lucky answer at the top cannot carry the calibration.
    """
    total = len(scored)
    if total == 0:
        return Calibration(None, 0.0, 0.0, 0, 0, target)
    ordered = sorted(scored, key=lambda item: item[0], reverse=True)
    best: tuple[float, int, int] | None = None  # threshold, covered, agreed
    agreed = 0
    # Walk from the most confident answer down; the answers at or above a confidence are a prefix, so each
    # candidate's agreement rate costs O(1). Ties share one threshold: evaluate only at the tie's end.
    for index, (confidence, ok) in enumerate(ordered):
        agreed += int(ok)
        covered = index + 1
        if covered < total and ordered[covered][0] == confidence:
            continue
        if covered >= min_covered and agreed / covered >= target:
            best = (confidence, covered, agreed)  # a lower threshold that still meets the target wins
    if best is None:
        return Calibration(None, 0.0, 0.0, 0, total, target)
    threshold, covered, good = best
    return Calibration(threshold, covered / total, good / covered, covered, total, target)


def routing_calibration(
    scored: Sequence[tuple[float, bool]], served_agreement: float, gate: Calibration, min_covered: int = 1
) -> Calibration:
    """The calibration a promotion carries to routing: at ``served_agreement`` (what the answers the student
    serves should agree at), or the gate's (at ``quality_threshold``) where no threshold reaches it."""
    served = calibrate_threshold(scored, served_agreement, min_covered)
    return served if served.threshold is not None else gate


def coverage_at(scored: Sequence[tuple[float, bool]], threshold: float) -> tuple[float, float]:
    """(coverage, agreement among the covered) at a given threshold, e.g. the router's configured one."""
    kept = [ok for confidence, ok in scored if confidence >= threshold]
    if not scored or not kept:
        return 0.0, 0.0
    return len(kept) / len(scored), sum(kept) / len(kept)
