"""The drift monitor's rules (pure): firing, not firing on few samples or insignificant figures, boundaries,
the references, windows, cool-down and the evidence."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from services.core.agents import Drift
from services.core.lifecycle import fold
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered
from services.drift_monitor import rules
from services.drift_monitor.rules import FallbackReference

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
DRIFT = Drift(
    window_minutes=60,
    min_samples=30,
    agreement_drop=0.05,
    unseen_intent_share=0.2,
    fallback_rate_rise=0.15,
    alpha=0.01,
    cooldown_minutes=30,
)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def promoted(minutes: float = 0, version: int = 1, **kw) -> ModelEvent:
    return ModelEvent(
        agent_id="a", kind="promoted", model_name="student_a", model_version=version, created_at=at(minutes), **kw
    )


# Statistics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "p", "cdf", "sf"),
    [
        (0, 3, 0.9, 0.001, 1.0),
        (3, 3, 0.9, 1.0, 0.729),
        (5, 5, 0.5, 1.0, 0.03125),
        (0, 0, 0.5, 1.0, 1.0),
        (-1, 5, 0.5, 0.0, 1.0),
        (6, 5, 0.5, 1.0, 0.0),
        (2, 5, 0.0, 1.0, 0.0),
        (2, 5, 1.0, 0.0, 1.0),
        (12, 30, 0.2, 0.9968889513680166, 0.009493122174722497),  # scipy.stats.binom
        (20, 40, 0.9, 1.8718579354173924e-10, 0.9999999999804035),
    ],
)
def test_binomial_tails(k: int, n: int, p: float, cdf: float, sf: float) -> None:
    assert rules.binom_cdf(k, n, p) == pytest.approx(cdf, rel=1e-9, abs=1e-15)
    assert rules.binom_sf(k, n, p) == pytest.approx(sf, rel=1e-9, abs=1e-15)


def test_binomial_tails_match_scipy_on_a_grid() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 7, 30, 250):
        for p in (0.05, 0.5, 0.9):
            for k in range(0, n + 1, max(1, n // 9)):
                assert rules.binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-7, abs=1e-300)
                assert rules.binom_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-7, abs=1e-300)


def test_wilson_interval_and_js_divergence() -> None:
    lo, hi = rules.wilson_interval(20, 40)
    assert (round(lo, 4), round(hi, 4)) == (0.352, 0.648)
    assert rules.wilson_interval(0, 0) == (0.0, 1.0)
    assert rules.wilson_interval(10, 10)[1] == 1.0
    assert rules.js_divergence({"a": 3, "b": 1}, {"a": 30, "b": 10}) == pytest.approx(0.0, abs=1e-12)
    assert rules.js_divergence({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    assert 0 < rules.js_divergence({"a": 1, "b": 1}, {"a": 1}) < 1
    assert rules.js_divergence({}, {"a": 1}) == 0.0


# Agreement drift --------------------------------------------------------------------------------------------
def test_agreement_fires_on_a_significant_drop() -> None:
    result = rules.agreement_drift(20, 40, 0.95, DRIFT)
    assert result.fired and result.rule == "agreement_drift"
    assert result.observed == 0.5 and result.limit == pytest.approx(0.90) and result.p_value < 1e-9
    assert result.statistic is not None and result.statistic < -8
    assert result.details["drop"] == pytest.approx(0.45)


def test_agreement_few_samples_never_fire() -> None:
    # 29 shadow samples that all disagree: below min_samples, however bad.
    result = rules.agreement_drift(0, 29, 0.95, DRIFT)
    assert not result.fired and "fewer than min_samples 30" in result.why
    # With min_samples 1 the test alone guards: three disagreements are significant at alpha 0.01
    # (P = 0.001), one is not (P = 0.1).
    loose = DRIFT.model_copy(update={"min_samples": 1})
    assert rules.agreement_drift(0, 3, 0.95, loose).fired
    assert not rules.agreement_drift(0, 1, 0.95, loose).fired


def test_agreement_below_the_limit_but_not_significant_does_not_fire() -> None:
    result = rules.agreement_drift(26, 30, 0.95, DRIFT)  # 0.867 < limit 0.90, p = 0.35
    assert not result.fired and result.observed < result.limit and result.p_value > 0.3


def test_agreement_boundary_exactly_at_the_limit_does_not_fire() -> None:
    # 900 of 1000 = 0.90 = 0.95 - 0.05 exactly: the drop is reached but not significantly exceeded.
    assert not rules.agreement_drift(900, 1000, 0.95, DRIFT).fired
    assert rules.agreement_drift(860, 1000, 0.95, DRIFT).fired  # 0.86: 4 points past the limit on 1000


def test_agreement_healthy_and_without_reference() -> None:
    assert not rules.agreement_drift(40, 40, 0.95, DRIFT).fired
    assert not rules.agreement_drift(39, 40, 0.95, DRIFT).fired
    skipped = rules.agreement_drift(0, 100, None, DRIFT)
    assert not skipped.fired and "no validation agreement" in skipped.why


# Intent shift -----------------------------------------------------------------------------------------------
TRAINED = {"card_arrival": 40, "exchange_rate": 35, "": 2}


def test_intent_shift_fires_on_many_unseen_intents() -> None:
    window = {"card_arrival": 20, "exchange_rate": 10, "crypto": 15, "cluster_03": 5, None: 12}
    result = rules.intent_shift(window, TRAINED, DRIFT)
    assert result.fired and result.samples == 50 and result.hits == 20  # unlabelled requests left out
    assert result.observed == pytest.approx(0.4) and result.p_value < 0.01
    assert result.details["unlabelled"] == 12
    assert result.details["unseen_intents"] == {"crypto": 15, "cluster_03": 5}
    assert (result.details["unseen_named"], result.details["unseen_clustered"]) == (15, 5)
    assert 0 < result.details["js_divergence"] <= 1


def test_intent_shift_above_the_share_but_not_significant() -> None:
    window = {"card_arrival": 50, "exchange_rate": 28, "crypto": 22}  # 22 % of 100 vs 20 %
    result = rules.intent_shift(window, TRAINED, DRIFT)
    assert not result.fired and result.observed >= DRIFT.unseen_intent_share and result.p_value > 0.1


def test_intent_shift_few_samples_and_no_snapshot() -> None:
    few = rules.intent_shift({"crypto": 29, None: 100}, TRAINED, DRIFT)  # every labelled one unseen, only 29
    assert not few.fired and "29 labelled requests" in few.why and few.hits == 29
    none = rules.intent_shift({"crypto": 100}, None, DRIFT)
    assert not none.fired and "no intent counts" in none.why
    assert not rules.intent_shift({"crypto": 100}, {}, DRIFT).fired


def test_intent_shift_healthy_and_a_share_of_one_never_fires() -> None:
    assert not rules.intent_shift({"card_arrival": 60, "exchange_rate": 40}, TRAINED, DRIFT).fired
    everything = DRIFT.model_copy(update={"unseen_intent_share": 1.0})
    assert not rules.intent_shift({"crypto": 500}, TRAINED, everything).fired


def test_an_intent_with_zero_training_examples_is_unseen() -> None:
    result = rules.intent_shift({"card_arrival": 10, "crypto": 40}, {"card_arrival": 5, "crypto": 0}, DRIFT)
    assert result.hits == 40 and result.fired


# Fallback rate ----------------------------------------------------------------------------------------------
CALIBRATED = FallbackReference(0.2, "calibration")


def test_fallback_rise_fires_against_the_calibration() -> None:
    result = rules.fallback_rate(30, 50, CALIBRATED, DRIFT)  # 0.60 vs limit 0.35
    assert result.fired and result.limit == pytest.approx(0.35) and result.reference == 0.2
    assert result.details == {"rise": pytest.approx(0.4), "reference_source": "calibration"}


def test_fallback_rise_not_significant_or_too_few() -> None:
    assert not rules.fallback_rate(18, 50, CALIBRATED, DRIFT).fired  # 0.36 just past 0.35
    few = rules.fallback_rate(29, 29, CALIBRATED, DRIFT)
    assert not few.fired and "fewer than min_samples" in few.why
    assert not rules.fallback_rate(10, 50, CALIBRATED, DRIFT).fired  # 0.20: no rise at all


def test_fallback_against_a_first_window_sample() -> None:
    first = FallbackReference(0.1, "first_window", samples=100, hits=10)
    fired = rules.fallback_rate(40, 80, first, DRIFT)  # 0.50 vs 0.10 + 0.15
    assert fired.fired and fired.test.startswith("two-proportion") and fired.details["reference_samples"] == 100
    assert not rules.fallback_rate(24, 80, first, DRIFT).fired  # 0.30: past 0.25, not significantly
    # A tiny reference sample is uncertain: the same rise on a 30-request reference needs more evidence.
    small = FallbackReference(0.1, "first_window", samples=30, hits=3)
    assert rules.fallback_rate(40, 80, small, DRIFT).p_value > fired.p_value


def test_fallback_without_reference_or_with_an_unreachable_limit() -> None:
    skipped = rules.fallback_rate(50, 50, None, DRIFT)
    assert not skipped.fired and "no reference" in skipped.why
    assert not rules.fallback_rate(50, 50, FallbackReference(0.9, "calibration"), DRIFT).fired  # limit 1.05


def test_fallback_reference_choice() -> None:
    calibrated = promoted(confidence_threshold=0.7, metrics={"agreement": 0.95, "coverage": 0.75})
    assert rules.fallback_reference(calibrated, DRIFT, None) == FallbackReference(0.25, "calibration")
    uncalibrated = promoted(metrics={"agreement": 0.95, "coverage": 0.75})  # router uses its configured threshold
    assert rules.fallback_reference(uncalibrated, DRIFT, None) is None
    assert rules.fallback_reference(uncalibrated, DRIFT, (6, 40)) == FallbackReference(0.15, "first_window", 40, 6)
    assert rules.fallback_reference(uncalibrated, DRIFT, (6, 29)) is None  # the first window was too quiet
    no_coverage = promoted(confidence_threshold=0.7, metrics={"coverage": 0.0})
    assert rules.fallback_reference(no_coverage, DRIFT, (0, 30)).source == "first_window"
    forced = DRIFT.model_copy(update={"fallback_reference": "first_window"})
    assert rules.fallback_reference(calibrated, forced, (3, 30)).source == "first_window"


# Choosing, windows, cool-down -------------------------------------------------------------------------------
def test_choose_by_priority() -> None:
    a = rules.agreement_drift(20, 40, 0.95, DRIFT)
    i = rules.intent_shift({"crypto": 40}, TRAINED, DRIFT)
    f = rules.fallback_rate(30, 50, CALIBRATED, DRIFT)
    assert rules.choose([f, i, a]) is a
    assert rules.choose([f, i]) is i
    assert rules.choose([rules.agreement_drift(40, 40, 0.95, DRIFT), f]) is f
    assert rules.choose([rules.agreement_drift(40, 40, 0.95, DRIFT)]) is None


def test_window_starts_no_earlier_than_the_promotion() -> None:
    assert rules.window(at(90), DRIFT, at(0)) == rules.Window(at(30), at(90))
    assert rules.window(at(10), DRIFT, at(0)) == rules.Window(at(0), at(10))
    assert rules.window(at(0), DRIFT, at(0)).empty
    assert rules.baseline_window(DRIFT, at(5)) == rules.Window(at(5), at(65))


def test_cool_down_from_the_latest_trigger_and_the_stage() -> None:
    events = [
        promoted(0, metrics={"agreement": 0.95}),
        RetrainTriggered(agent_id="a", reason="agreement_drift", created_at=at(10)),
        RetrainTriggered(agent_id="b", reason="manual", created_at=at(50)),  # another agent's
        RetrainTriggered(agent_id="a", reason="grace_complete", created_at=at(15)),  # before any student: no cool-down
        ModelEvent(agent_id="a", kind="rejected", model_name="student_a", created_at=at(20)),
    ]
    until = rules.cooldown_until("a", events, DRIFT)
    assert until == at(40)
    state = fold("a", events)
    assert state.stage == "live"  # the retrain was rejected; the old student serves on
    assert rules.blocked(state, until, at(39)) == f"cool-down until {at(40).isoformat()}"
    assert rules.blocked(state, until, at(40)) is None
    retraining = fold("a", events[:2])
    assert rules.blocked(retraining, until, at(100)) == "stage retraining, not live"
    assert rules.blocked(fold("a", []), None, at(0)) == "stage grace, not live"
    assert rules.cooldown_until("c", events, DRIFT) is None
    none = DRIFT.model_copy(update={"cooldown_minutes": 0})
    assert rules.blocked(state, rules.cooldown_until("a", events, none), at(20)) is None


def test_current_model_and_its_snapshot() -> None:
    first = promoted(0, 1, snapshot_id="ds-1")
    second = ModelEvent(
        agent_id="a",
        kind="rolled_back",
        model_name="student_a",
        model_version=3,
        lineage={"snapshot_id": "ds-0"},
        created_at=at(5),
    )
    candidate = ModelEvent(agent_id="a", kind="candidate", model_name="student_a", created_at=at(9))
    snapshot = DatasetSnapshot(snapshot_id="ds-2", agent_id="a", version=2, content_hash="h", uri="u", created_at=at(8))
    assert rules.current_model("a", [first, second, candidate, snapshot]) is second
    assert rules.snapshot_of(second) == "ds-0" and rules.snapshot_of(first) == "ds-1"
    assert rules.current_model("b", [first]) is None


def test_evidence_names_window_figures_test_and_query() -> None:
    event = promoted(0, 2, snapshot_id="ds-1", metrics={"agreement": 0.95})
    state = fold("a", [event])
    span = rules.window(at(30), DRIFT, state.promoted_at)
    results = [rules.agreement_drift(20, 40, 0.95, DRIFT), rules.intent_shift({"x": 1}, None, DRIFT)]
    params = {"agent": "a", "start": "2025-03-01 12:00:00.000000", "end": "2025-03-01 12:30:00.000000"}
    out = rules.evidence(state, event, span, results[0], results, {"agreement_drift": ("\nSELECT 1\n", params)}, DRIFT)
    out = json.loads(json.dumps(out))  # JSON all the way down
    assert out["rule"] == "agreement_drift" and out["window"]["start"] == at(0).isoformat()
    assert out["window"]["end"] == at(30).isoformat() and out["window"]["minutes"] == 60
    assert out["model"] == {
        "name": "student_a",
        "version": 2,
        "promoted_at": at(0).isoformat(),
        "snapshot_id": "ds-1",
        "validation_agreement": 0.95,
    }
    figures = out["figures"]
    assert figures["fired"] and figures["samples"] == 40 and figures["hits"] == 20 and figures["observed"] == 0.5
    assert 0 < figures["p_value"] < 1e-9 and figures["test"].startswith("exact binomial")
    assert figures["wilson_95"] == [0.352, 0.648]
    assert out["query"] == {"sql": "SELECT 1", "parameters": params}
    assert set(out["rules"]) == {"agreement_drift", "intent_shift"} and not out["rules"]["intent_shift"]["fired"]


def test_docs_show_the_monitor_sql() -> None:
    from pathlib import Path

    from services.drift_monitor import queries

    doc = (Path(__file__).resolve().parents[2] / "docs" / "drift.md").read_text()
    for name in ("SHADOW_PAIRS_SQL", "INTENTS_SQL", "TRAINED_INTENTS_SQL", "FALLBACK_SQL"):
        assert getattr(queries, name).strip() in doc, f"docs/drift.md is missing the text of queries.{name}"
    assert queries.param_time(at(0.5) + timedelta(microseconds=7)) == "2025-03-01 12:00:30.000007"
