"""The demo's plan and report (pure parts)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.core.records import DatasetSnapshot, GateVerdict, ModelEvent, RetrainTriggered
from services.demo.plan import frequent_intents, make_plan, phase_intents, split_counts
from services.demo.report import DemoReport, PhaseFigures, describe_event, timeline
from services.teacher.workloads import load_workload

DATA = Path(__file__).resolve().parents[2] / "data"
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def banking77():
    return load_workload("banking77", DATA)


def test_plan_is_narrow_then_shifts_to_held_back_intents(banking77) -> None:
    plan = make_plan(banking77, 20)
    ordered = frequent_intents(banking77)
    assert plan.agent_id == "support-bot" and plan.intents == tuple(ordered[:20])
    assert plan.held_back == tuple(ordered[20:25]) and not set(plan.intents) & set(plan.held_back)
    assert [p.name for p in plan.phases] == ["grace", "live", "drift", "recovery"]
    assert plan.phase("grace").split == "train" and plan.phase("live").split == "test"  # unseen messages live
    drift = plan.phase("drift")
    (usual, n_usual), (held, n_held) = phase_intents(plan, drift)
    assert usual == plan.intents and held == plan.held_back and n_usual + n_held == drift.requests
    assert phase_intents(plan, plan.phase("live")) == [(plan.intents, plan.phase("live").requests)]
    short = make_plan(banking77, 20, short=True)
    sizes = {s.name: (s.requests, f.requests) for s, f in zip(short.phases, plan.phases, strict=True)}
    assert sizes["grace"][0] == sizes["grace"][1] and sizes["drift"][0] == sizes["drift"][1]  # data, detection
    assert sizes["live"][0] < sizes["live"][1] and sizes["recovery"][0] < sizes["recovery"][1]
    assert plan.phase("grace").requests == 1200  # about 1,000 training pairs
    assert make_plan(banking77, 20, grace_conversations=1500).phase("grace").requests == 1500  # completes grace
    with pytest.raises(ValueError, match=r"needs 75 \+ 5"):
        make_plan(banking77, 75)
    with pytest.raises(KeyError, match="no phase"):
        plan.phase("nope")


def test_split_counts() -> None:
    assert split_counts(500, 0.5) == (250, 250)
    assert split_counts(7, 0.0) == (7, 0)
    assert split_counts(3, 1.0) == (0, 3)


def _phase(name: str, **kw: float) -> PhaseFigures:
    return PhaseFigures(name, name, T0, T0 + timedelta(minutes=1), **kw)  # type: ignore[arg-type]


def test_report_figures_and_markdown() -> None:
    grace = _phase("grace", requests=100, teacher=100, cost_usd=1.0, teacher_only_cost_usd=1.0, teacher_p95_ms=700)
    live = _phase(
        "live",
        requests=100,
        student=96,
        teacher=4,
        student_eligible=100,
        fallbacks=4,
        shadow_samples=10,
        shadow_agreed=9,
        gold_total=100,
        gold_correct=80,
        cost_usd=0.5,
        teacher_only_cost_usd=1.0,
        teacher_p95_ms=650,
        student_p95_ms=300,
    )
    report = DemoReport(
        "support-bot",
        "banking77",
        "selective",
        "cost-optimized",
        T0,
        T0 + timedelta(minutes=30),
        [grace, live],
        holdout={"agreement": 0.8, "selective_agreement": 0.95, "coverage": 0.7},
    )
    assert live.student_share == 0.96 and live.fallback_rate == 0.04 and live.live_agreement == 0.9
    assert live.savings == 0.5 and grace.live_agreement is None and grace.fallback_rate == 0.0
    summary = report.summary()
    assert summary["agreement_live"] == 0.9 and summary["student_share"] == 0.96
    assert summary["cost_usd"] == 1.5 and summary["teacher_only_cost_usd"] == 2.0 and summary["savings_pct"] == 25.0
    assert summary["teacher_p95_ms"] == 700 and summary["student_p95_ms"] == 300
    assert summary["agreement_holdout"] == 0.8
    assert summary["duration_s"] == 1800
    # The live phase alone: teacher answers (fallbacks) agree by definition, the student's at the shadow rate.
    assert summary["student_share_live"] == 0.96 and summary["fallback_rate_live"] == 0.04
    assert summary["agreement_after_fallback_live"] == pytest.approx((4 + 96 * 0.9) / 100)
    assert summary["savings_pct_live"] == 50.0 and summary["student_p95_ms_live"] == 300
    md = report.markdown()
    assert "| live | 100 | 96.0 % | 4.0 % | 90.0 % (10) | 80.0 % | $0.5000 | $1.0000 | 50.0 % | 650 ms | 300 ms |" in md
    assert "| total | 200 |" in md and "quality gate `selective`" in md
    assert (
        "Live phase: the student served 96.0 % (fallback 4.0 %); what was served agreed with the teacher at "
        "0.904; saved 50.0 % at list prices" in md
    )
    assert report.to_json()["phases"][1]["student_share"] == 0.96


def test_timeline_describes_the_lifecycle() -> None:
    events = [
        RetrainTriggered(agent_id="a", reason="grace_complete", created_at=T0),
        DatasetSnapshot(
            snapshot_id="s1",
            agent_id="a",
            version=1,
            content_hash="h",
            uri="file:///x",
            split_counts={"train": 850, "holdout": 150},
            created_at=T0 + timedelta(seconds=5),
        ),
        ModelEvent(
            agent_id="a",
            kind="rejected",
            model_name="student_a",
            gate=GateVerdict(passed=False, mode="overall", reasons=["agreement 0.61 < 0.92"]),
            created_at=T0 + timedelta(seconds=9),
        ),
        ModelEvent(
            agent_id="a",
            kind="promoted",
            model_name="student_a",
            model_version=2,
            metrics={"agreement": 0.9},
            confidence_threshold=0.8,
            created_at=T0 + timedelta(seconds=20),
        ),
        RetrainTriggered(agent_id="b", reason="manual", created_at=T0),
    ]
    entries = timeline(events, "a", T0)
    assert [e.what for e in entries] == [
        "retrain triggered: grace_complete",
        "snapshot s1 v1 (holdout 150, train 850)",
        "rejected: agreement 0.61 < 0.92",
        "promoted as version 2: holdout agreement 0.900, confidence threshold 0.80",
    ]
    assert describe_event(events[3]).startswith("promoted")


def test_a_triggers_brief_keeps_its_summary_and_leaves_out_the_sql() -> None:
    from services.demo.run import _brief

    summary = "0.326 of 138 labelled requests on 28 unseen intents (limit 0.200), p=0.000336 (alpha 0.01)"
    evidence = json.dumps({"rule": "intent_shift", "summary": summary, "alpha": 0.01, "query": "SELECT 1"})
    assert _brief(evidence) == {"summary": summary, "rule": "intent_shift", "alpha": 0.01}
    assert _brief("not json") == {"evidence": "not json"}


def test_the_student_is_priced_at_list_and_self_hosted_prices_with_the_ideal_beside() -> None:
    from services.core.agents import Prices, SelfHosted, Tier

    tier = Tier(
        teacher=Prices(input_per_1m=1.0, output_per_1m=2.0),
        student=Prices(input_per_1m=0.5, output_per_1m=1.0),
        student_self_hosted=SelfHosted(usd_per_hour=3.6, answers_per_s=1000),
    )  # $0.000001 an answer
    # 10 requests: 8 served by the student, 2 fell back to the teacher (both models billed for those).
    student_list = tier.student.cost(10 * 40, 10 * 10)  # 10 student answers of 40 tokens in, 10 out
    teacher = tier.teacher.cost(2 * 30, 2 * 40)
    p = _phase(
        "live",
        requests=10,
        student=8,
        teacher=2,
        student_answers=10,
        student_input_tokens=400,
        student_output_tokens=100,
        cost_usd=student_list + teacher,
        teacher_only_cost_usd=tier.teacher.cost(300, 400),
    )
    got = p.prices(tier)
    assert got["cost_usd"] == pytest.approx(student_list + teacher)
    assert got["cost_self_hosted_usd"] == pytest.approx(teacher + 10 * 1e-6)
    assert got["savings_self_hosted"] > got["savings"]
    assert got["ideal_savings"] == pytest.approx(1 - 10 * (student_list / 10) / tier.teacher.cost(300, 400))
    assert (
        _phase("grace", requests=5, teacher=5, cost_usd=1.0, teacher_only_cost_usd=1.0).prices(tier)["ideal_savings"]
        == 0.0
    )
