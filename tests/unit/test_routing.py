"""Every routing branch, the canary ramp and the cost arithmetic (pure functions, literal inputs)."""

from __future__ import annotations

import pytest

from services.core.agents import DEFAULT_TIERS
from services.core.student import retry_with_latest
from services.router import routing
from services.router.routing import AgentView, Usage, after_student, canary_share, costs, plan


def view(**kw) -> AgentView:
    base = dict(
        mode="auto", stage="live", has_student=True, confidence_threshold=0.85, shadow_rate=0.05, canary_share=1.0
    )
    return AgentView(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "u", "ask_student", "reason"),
    [
        (dict(mode="teacher"), 0.0, False, routing.MODE_TEACHER),
        (dict(stage="grace", has_student=False), 0.0, False, routing.GRACE_PERIOD),
        (dict(stage="training", has_student=False), 0.0, False, routing.NO_STUDENT),
        (dict(stage="validating", has_student=False), 0.0, False, routing.NO_STUDENT),
        (dict(mode="student", stage="grace", has_student=False), 0.0, False, routing.GRACE_PERIOD),
        (dict(mode="student"), 0.99, True, routing.MODE_STUDENT),
        (dict(), 0.5, True, routing.CONFIDENT),
        (dict(stage="retraining"), 0.5, True, routing.CONFIDENT),
        (dict(canary_share=0.1), 0.05, True, routing.CONFIDENT),
        (dict(canary_share=0.1), 0.10, False, routing.CANARY_HOLDOUT),
    ],
)
def test_plan(kw: dict, u: float, ask_student: bool, reason: str) -> None:
    got = plan(view(**kw), u)
    assert (got.ask_student, got.reason) == (ask_student, reason)


def test_confident_student_is_served_without_teacher() -> None:
    got = after_student(view(), confidence=0.9, student_failed=False, u_shadow=0.5)
    assert (got.served_by, got.reason, got.call_teacher, got.shadow) == ("student", routing.CONFIDENT, False, False)


def test_threshold_is_inclusive() -> None:
    assert after_student(view(), 0.85, False, 0.5).served_by == "student"


def test_low_confidence_falls_back_to_the_teacher_as_training_data() -> None:
    got = after_student(view(), confidence=0.4, student_failed=False, u_shadow=0.0)
    assert (got.served_by, got.reason, got.call_teacher, got.shadow, got.training_candidate) == (
        "teacher",
        routing.LOW_CONFIDENCE,
        True,
        False,
        True,
    )


def test_missing_confidence_counts_as_unsure() -> None:
    assert after_student(view(), None, False, 0.9).reason == routing.LOW_CONFIDENCE


def test_student_error_falls_back() -> None:
    got = after_student(view(), None, True, 0.0)
    assert (got.served_by, got.reason, got.training_candidate) == ("teacher", routing.STUDENT_ERROR, True)


def test_shadow_sampling_by_draw() -> None:
    shadowed = after_student(view(shadow_rate=0.05), 0.95, False, 0.049)
    assert (shadowed.served_by, shadowed.shadow, shadowed.call_teacher) == ("student", True, True)
    assert not after_student(view(shadow_rate=0.05), 0.95, False, 0.05).shadow
    assert not after_student(view(shadow_rate=0.0), 0.95, False, 0.0).shadow


def test_pinned_student_ignores_the_threshold_but_is_still_shadowed() -> None:
    got = after_student(view(mode="student"), 0.1, False, 0.01)
    assert (got.served_by, got.reason, got.shadow) == ("student", routing.MODE_STUDENT, True)


def test_canary_ramp() -> None:
    steps = [0.1, 0.5, 1.0]
    assert canary_share(steps, 0, 100) == 0.1
    assert canary_share(steps, 99, 100) == 0.1
    assert canary_share(steps, 100, 100) == 0.5
    assert canary_share(steps, 250, 100) == 1.0
    assert canary_share(steps, 10**6, 100) == 1.0


def test_the_canary_ramp_counts_every_live_request_it_decided_on() -> None:
    # The requests kept from the student (canary_holdout) move the ramp on too: at a 10 % first step, counting
    # only the student's would hold that step for ten times its length.
    assert routing.counts_for_canary(routing.Plan(True, routing.CONFIDENT))
    assert routing.counts_for_canary(routing.Plan(False, routing.CANARY_HOLDOUT))
    assert not routing.counts_for_canary(routing.Plan(False, routing.GRACE_PERIOD))
    assert not routing.counts_for_canary(routing.Plan(False, routing.MODE_TEACHER))


def test_costs_teacher_only() -> None:
    tier = DEFAULT_TIERS["cost-optimized"]  # teacher $0.60 / $3.00 per 1M
    got = costs(tier, Usage(1000, 200), None)
    assert got.cost_usd == pytest.approx((1000 * 0.60 + 200 * 3.00) / 1e6)
    assert got.teacher_only_cost_usd == pytest.approx(got.cost_usd)


def test_costs_student_only_prices_the_counterfactual_on_student_tokens() -> None:
    tier = DEFAULT_TIERS["cost-optimized"]  # student $0.30 / $2.50
    got = costs(tier, None, Usage(1000, 200))
    assert got.cost_usd == pytest.approx((1000 * 0.30 + 200 * 2.50) / 1e6)
    assert got.teacher_only_cost_usd == pytest.approx((1000 * 0.60 + 200 * 3.00) / 1e6)


def test_costs_fallback_pays_both() -> None:
    tier = DEFAULT_TIERS["accuracy-optimized"]  # teacher $1.50 / $15, student $0.90 / $5
    got = costs(tier, Usage(100, 10), Usage(100, 12))
    assert got.teacher_usd == pytest.approx((100 * 1.5 + 10 * 15) / 1e6)
    assert got.student_usd == pytest.approx((100 * 0.9 + 12 * 5) / 1e6)
    assert got.cost_usd == pytest.approx(got.teacher_usd + got.student_usd)
    assert got.teacher_only_cost_usd == pytest.approx(got.teacher_usd)


def test_approx_tokens() -> None:
    from services.teacher.base import approx_tokens

    assert approx_tokens(None) == 0
    assert approx_tokens("") == 0
    assert approx_tokens("abc") == 1
    assert approx_tokens("a" * 40) == 10


@pytest.mark.parametrize(
    ("version", "status", "retry"),
    [
        (3, "StatusCode.UNAVAILABLE", True),  # a hot swap unloaded version 3: the latest answers
        (3, "StatusCode.INTERNAL", True),
        (3, None, True),
        (3, "StatusCode.DEADLINE_EXCEEDED", False),  # asking again would only wait again, and load the student
        (3, "StatusCode.CANCELLED", False),
        (None, "StatusCode.UNAVAILABLE", False),  # already the latest
    ],
)
def test_a_failed_student_request_is_asked_of_the_latest_version_only_after_a_swap(
    version: int | None, status: str | None, retry: bool
) -> None:
    assert retry_with_latest(version, status) is retry
