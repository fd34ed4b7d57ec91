"""The quality gate (pure): does a candidate student go live?

* ``overall`` (the seed's rule): holdout agreement >= ``quality_threshold`` over all answers, and format
  compliance >= ``format_threshold``.
* ``selective``: agreement >= ``quality_threshold`` among the answers at or above the calibrated confidence
  threshold, with coverage (the share of answers kept) >= ``min_coverage``, and format compliance as above.
  The student then serves only what it is sure of; fallbacks to the teacher grow its data for the next round.

Every failing condition gives one reason naming the metric, its value and the threshold, so a rejection
event says exactly why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.core.agents import Validation
from services.core.records import GateVerdict


@dataclass(frozen=True)
class GateInputs:
    agreement: float
    format_compliance: float
    selective_agreement: float
    coverage: float
    holdout_size: int
    confidence_threshold: float | None


def _below(name: str, value: float, threshold: float, key: str) -> str:
    return f"{name} {value:.4f} < {threshold:.4f} ({key})"


def decide(inputs: GateInputs, validation: Validation, mode: str | None = None) -> GateVerdict:
    """The verdict for ``inputs`` under the agent's ``validation`` settings (``mode`` overrides its mode)."""
    mode = mode or validation.gate_mode
    if mode not in ("overall", "selective"):
        raise ValueError(f"unknown gate mode {mode!r}; known: overall, selective")
    reasons: list[str] = []
    if inputs.holdout_size <= 0:
        reasons.append("holdout is empty: nothing to validate on")
    if inputs.format_compliance < validation.format_threshold:
        reasons.append(
            _below("format_compliance", inputs.format_compliance, validation.format_threshold, "format_threshold")
        )
    if mode == "overall":
        if inputs.agreement < validation.quality_threshold:
            reasons.append(_below("agreement", inputs.agreement, validation.quality_threshold, "quality_threshold"))
    else:
        if inputs.confidence_threshold is None:
            reasons.append(
                f"no confidence threshold reaches agreement {validation.quality_threshold:.4f} (quality_threshold)"
            )
        elif inputs.selective_agreement < validation.quality_threshold:
            reasons.append(
                _below(
                    "selective_agreement",
                    inputs.selective_agreement,
                    validation.quality_threshold,
                    "quality_threshold",
                )
            )
        if inputs.coverage < validation.min_coverage:
            reasons.append(_below("coverage", inputs.coverage, validation.min_coverage, "min_coverage"))
    return GateVerdict(passed=not reasons, mode=mode, reasons=reasons)


@dataclass(frozen=True)
class FormatTrial:
    """One weight format's holdout figures (the same holdout, the same decoder)."""

    weight_format: str
    agreement: float
    format_compliance: float


def keeps_the_answers(trial: FormatTrial, fp32: FormatTrial, tolerance: float) -> bool:
    """A lighter format is served only if it agrees with the teacher within ``tolerance`` of fp32 and loses
    no format compliance."""
    return trial.agreement >= fp32.agreement - tolerance and trial.format_compliance >= fp32.format_compliance


def choose_format(fp32: FormatTrial, trials: list[FormatTrial], tolerance: float) -> FormatTrial:
    """The first trial (in the order given: fastest first, ``worth_trying``) that keeps the answers, else fp32."""
    return next((t for t in trials if keeps_the_answers(t, fp32, tolerance)), fp32)


def worth_trying(speeds: Mapping[str, float], order: Sequence[str], min_speedup: float) -> list[str]:
    """The lighter formats (of ``order``) that answered at least ``min_speedup`` times as fast as fp32 on this
    machine, fastest first. A format the CPU only emulates (bf16 without AVX512-BF16, int8 without VNNI: 5-12x
    slower than fp32 on an AVX2 machine here) keeps the answers and loses the speed: it is not even evaluated."""
    base = speeds.get("fp32", 0.0)
    kept = [f for f in order if f != "fp32" and base > 0 and speeds.get(f, 0.0) >= base * min_speedup]
    return sorted(kept, key=lambda f: -speeds[f])
