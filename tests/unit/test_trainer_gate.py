"""The quality gate and confidence calibration (pure)."""

from __future__ import annotations

import pytest

from services.core.agents import Validation
from services.trainer.calibrate import calibrate_threshold, coverage_at, routing_calibration
from services.trainer.gate import GateInputs, decide


def inputs(**kw: float) -> GateInputs:
    base = dict(
        agreement=0.95,
        format_compliance=0.99,
        selective_agreement=0.97,
        coverage=0.8,
        holdout_size=100,
        confidence_threshold=0.6,
    )
    base.update(kw)
    return GateInputs(**base)  # type: ignore[arg-type]


def test_overall_passes_at_threshold() -> None:
    verdict = decide(inputs(agreement=0.92), Validation(quality_threshold=0.92))
    assert verdict.passed and verdict.mode == "overall" and verdict.reasons == []


def test_overall_fails_on_agreement_naming_metric_value_and_threshold() -> None:
    verdict = decide(inputs(agreement=0.81), Validation(quality_threshold=0.92))
    assert not verdict.passed
    assert verdict.reasons == ["agreement 0.8100 < 0.9200 (quality_threshold)"]


def test_format_threshold_fails_in_both_modes() -> None:
    for mode in ("overall", "selective"):
        verdict = decide(inputs(format_compliance=0.9), Validation(format_threshold=0.95, gate_mode=mode))
        assert not verdict.passed
        assert verdict.reasons == ["format_compliance 0.9000 < 0.9500 (format_threshold)"]


def test_overall_ignores_coverage_selective_ignores_overall_agreement() -> None:
    low = inputs(agreement=0.5, coverage=0.6, selective_agreement=0.95)
    assert not decide(low, Validation(gate_mode="overall")).passed
    assert decide(low, Validation(gate_mode="selective", min_coverage=0.5)).passed


def test_selective_fails_on_coverage_and_selective_agreement() -> None:
    verdict = decide(inputs(selective_agreement=0.9, coverage=0.3), Validation(gate_mode="selective", min_coverage=0.5))
    assert not verdict.passed
    assert verdict.reasons == [
        "selective_agreement 0.9000 < 0.9200 (quality_threshold)",
        "coverage 0.3000 < 0.5000 (min_coverage)",
    ]


def test_selective_without_threshold_fails() -> None:
    verdict = decide(inputs(confidence_threshold=None, coverage=0.0), Validation(gate_mode="selective"))
    assert not verdict.passed
    assert verdict.reasons[0].startswith("no confidence threshold reaches agreement 0.9200")
    assert "coverage 0.0000 < 0.5000 (min_coverage)" in verdict.reasons


def test_mode_override_and_empty_holdout() -> None:
    verdict = decide(inputs(holdout_size=0), Validation(), mode="selective")
    assert verdict.mode == "selective" and verdict.reasons == ["holdout is empty: nothing to validate on"]
    with pytest.raises(ValueError, match="unknown gate mode"):
        decide(inputs(), Validation(), mode="strict")


def test_zero_thresholds_pass_anything() -> None:
    # Tests use thresholds of 0 (built without validation: the config refuses 0) to force a promotion.
    lax = Validation.model_construct(**{**Validation().model_dump(), "quality_threshold": 0.0, "format_threshold": 0.0})
    assert decide(inputs(agreement=0.0, format_compliance=0.0), lax).passed


# Calibration ------------------------------------------------------------------------------------------------
CASES = [
    # (scored, target, min_covered, expected threshold, coverage, selective agreement)
    ([], 0.9, 1, None, 0.0, 0.0),
    ([(0.9, True), (0.8, True), (0.7, True)], 0.9, 1, 0.7, 1.0, 1.0),
    # Dropping the wrong low-confidence answer reaches the target: the threshold is the next confidence up.
    ([(0.9, True), (0.8, True), (0.7, True), (0.2, False)], 0.9, 1, 0.7, 0.75, 1.0),
    # The lowest qualifying threshold wins even when a higher one has a better rate.
    (
        [(0.95, True), (0.9, False), (0.8, True), (0.7, True), (0.6, True), (0.5, True), (0.4, False)],
        0.8,
        1,
        0.5,
        6 / 7,
        5 / 6,
    ),
    # Nothing reaches the target.
    ([(0.9, False), (0.5, True)], 0.9, 1, None, 0.0, 0.0),
    # min_covered refuses a single lucky answer at the top.
    ([(0.99, True), (0.9, False), (0.8, False)], 0.9, 2, None, 0.0, 0.0),
    # Ties share one threshold: both 0.5s are in or out together.
    ([(0.9, True), (0.5, True), (0.5, False)], 0.9, 1, 0.9, 1 / 3, 1.0),
    # Target reached exactly.
    ([(0.9, True), (0.8, True), (0.7, True), (0.6, False)], 0.75, 1, 0.6, 1.0, 0.75),
]


@pytest.mark.parametrize(("scored", "target", "min_covered", "threshold", "coverage", "selective"), CASES)
def test_calibrate_threshold(scored, target, min_covered, threshold, coverage, selective) -> None:
    got = calibrate_threshold(scored, target, min_covered)
    assert got.threshold == threshold
    assert got.coverage == pytest.approx(coverage)
    assert got.selective_agreement == pytest.approx(selective)
    assert got.total == len(scored)


def test_routing_is_calibrated_for_the_served_agreement_else_falls_back_to_the_gate() -> None:
    # 10 answers by falling confidence: the top 6 all agree, then 2 of the next 4.
    scored = [(1.0 - i / 20, ok) for i, ok in enumerate([True] * 6 + [False, True, False, True])]
    gate = calibrate_threshold(scored, 0.75)
    assert (gate.threshold, gate.coverage) == (0.55, 1.0)  # 8 of 10 agree overall
    served = routing_calibration(scored, 0.95, gate)
    assert (served.threshold, served.coverage, served.selective_agreement, served.target) == (0.75, 0.6, 1.0, 0.95)
    assert routing_calibration(scored, 0.95, gate, min_covered=7) is gate  # nothing reaches 0.95 with 7 kept


def test_coverage_at() -> None:
    scored = [(0.9, True), (0.8, False), (0.3, True), (0.1, False)]
    assert coverage_at(scored, 0.5) == (0.5, 0.5)
    assert coverage_at(scored, 0.95) == (0.0, 0.0)
    assert coverage_at([], 0.5) == (0.0, 0.0)


def test_a_lighter_weight_format_is_served_only_when_it_keeps_the_answers() -> None:
    from services.trainer.gate import FormatTrial, choose_format

    fp32 = FormatTrial("fp32", 0.80, 1.0)
    int8 = FormatTrial("int8", 0.77, 1.0)  # 3 points lost
    bf16 = FormatTrial("bf16", 0.796, 1.0)  # within 0.5 points
    assert choose_format(fp32, [int8, bf16], 0.005) is bf16
    assert choose_format(fp32, [bf16, int8], 0.005) is bf16
    assert choose_format(fp32, [int8], 0.005) is fp32
    assert choose_format(fp32, [FormatTrial("bf16", 0.81, 0.99)], 0.005) is fp32  # format compliance lost
    assert choose_format(fp32, [], 0.005) is fp32


def test_only_formats_faster_than_fp32_on_this_machine_are_tried_fastest_first() -> None:
    from services.trainer.gate import worth_trying

    # A machine with AVX512-BF16 and VNNI: both lighter formats pay, the faster first.
    assert worth_trying({"fp32": 10.0, "int8": 14.0, "bf16": 21.0}, ["int8", "bf16"], 1.1) == ["bf16", "int8"]
    # An AVX2 machine emulates both: neither is tried (int8 kept the answers and was 12x slower here).
    assert worth_trying({"fp32": 10.0, "int8": 0.8, "bf16": 2.5}, ["int8", "bf16"], 1.1) == []
    assert worth_trying({"fp32": 10.0, "bf16": 10.5}, ["bf16"], 1.1) == []  # within noise: not worth the risk
    assert worth_trying({"fp32": 10.0, "bf16": 12.0}, ["int8", "bf16"], 1.1) == ["bf16"]  # int8 not probed
    assert worth_trying({}, ["bf16"], 1.1) == []
