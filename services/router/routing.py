"""The router's decisions, as pure functions of the agent's state and a few random draws (passed in, so
tests choose them). No clients, no clock.

Per request, in two steps:
1. ``plan``: before any model runs, who answers first (teacher only, or the student) and why.
2. ``after_student``: once the student answered (or failed), whether its answer is served, or the teacher is
   called as a fallback (that teacher answer becomes training data), or the teacher is called in the
   background as a shadow to measure agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.core.agents import Mode, Prices, Tier

Stage = Literal["grace", "training", "validating", "live", "retraining"]
LIVE_STAGES: frozenset[str] = frozenset({"live", "retraining"})

# route_reason values (also the vocabulary of the SQL cookbook).
MODE_TEACHER = "mode_teacher"  # the agent is pinned to the teacher
NO_STUDENT = "no_student"  # auto mode before any student was promoted (grace period, first training)
GRACE_PERIOD = "grace_period"  # ... specifically while the grace period collects data
CANARY_HOLDOUT = "canary_holdout"  # live, but this request fell outside the canary's share
CONFIDENT = "confident"  # the student answered above the confidence threshold
LOW_CONFIDENCE = "low_confidence"  # the student was unsure: the teacher answered (training data)
STUDENT_ERROR = "student_error"  # the student could not answer: the teacher answered
MODE_STUDENT = "mode_student"  # the agent is pinned to the student
# Plan-and-execute (plan.py, docs/plan-execute.md): the plan's own interaction, and the direct answer when the
# plan could not be used. The steps are routed by the rules below and carry their reasons.
PLAN = "plan"  # the teacher's plan, executed step by step
PLAN_INVALID = "plan_invalid"  # the teacher's plan was refused (bad JSON, too many steps...): see plan_fallback
PLAN_FALLBACK = "plan_fallback"  # ... so the teacher answered the request directly


@dataclass(frozen=True)
class AgentView:
    """What the router knows about an agent when a request arrives."""

    mode: Mode
    stage: Stage
    has_student: bool
    confidence_threshold: float
    shadow_rate: float
    canary_share: float  # share of student-eligible traffic the student gets now (1.0 = all)


@dataclass(frozen=True)
class Plan:
    ask_student: bool
    reason: str  # final when ask_student is False


def plan(view: AgentView, u_canary: float) -> Plan:
    """Who answers first. ``u_canary`` is a uniform draw in [0, 1)."""
    if view.mode == "teacher":
        return Plan(False, MODE_TEACHER)
    if view.mode == "student" and view.has_student:
        return Plan(True, MODE_STUDENT)
    if not view.has_student or view.stage not in LIVE_STAGES:
        # mode=student without a student is refused when set; a stale one degrades to the teacher.
        return Plan(False, GRACE_PERIOD if view.stage == "grace" else NO_STUDENT)
    if u_canary >= view.canary_share:
        return Plan(False, CANARY_HOLDOUT)
    return Plan(True, CONFIDENT)


@dataclass(frozen=True)
class AfterStudent:
    served_by: Literal["student", "teacher"]
    reason: str
    call_teacher: bool  # the teacher runs for this request (fallback or shadow)
    shadow: bool  # the teacher runs in the background; the student's answer is served
    training_candidate: bool  # the teacher's answer is meant as training data


def after_student(view: AgentView, confidence: float | None, student_failed: bool, u_shadow: float) -> AfterStudent:
    """Given the student's outcome: serve it, fall back to the teacher, or serve it and shadow it."""
    if student_failed:
        return AfterStudent("teacher", STUDENT_ERROR, call_teacher=True, shadow=False, training_candidate=True)
    pinned = view.mode == "student"
    if not pinned and (confidence is None or confidence < view.confidence_threshold):
        return AfterStudent("teacher", LOW_CONFIDENCE, call_teacher=True, shadow=False, training_candidate=True)
    shadow = u_shadow < view.shadow_rate
    reason = MODE_STUDENT if pinned else CONFIDENT
    return AfterStudent("student", reason, call_teacher=shadow, shadow=shadow, training_candidate=False)


def counts_for_canary(first: Plan) -> bool:
    """Whether a request moves the canary ramp on: every request of a live agent that the ramp decided on,
    the ones it kept from the student included (counting only those the student answered would hold the
    first step for ``step_requests / share`` requests, ten times its length at 10 %)."""
    return first.ask_student or first.reason == CANARY_HOLDOUT


def canary_share(steps: list[float], served_since_promotion: int, step_requests: int) -> float:
    """The canary ramp: ``steps[i]`` for the i-th block of ``step_requests`` student-eligible requests since
    the promotion, then the last step (1.0) for good."""
    index = min(served_since_promotion // step_requests, len(steps) - 1)
    return steps[index]


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Costs:
    cost_usd: float  # what the request actually cost: every model call made for it (shadows included)
    teacher_only_cost_usd: float  # what it would have cost had the teacher alone answered it
    teacher_usd: float
    student_usd: float


def costs(tier: Tier, teacher: Usage | None, student: Usage | None, teacher_estimate: Usage | None = None) -> Costs:
    """Cost accounting at the tier's prices: each model billed on its own token counts. When the teacher did not
    run, its counterfactual cost is priced on ``teacher_estimate`` (the request and the full answer), else on the
    student's counts."""
    teacher_usd = _price(tier.teacher, teacher)
    student_usd = _price(tier.student, student)
    baseline = teacher if teacher is not None else (teacher_estimate or student)
    return Costs(
        cost_usd=teacher_usd + student_usd,
        teacher_only_cost_usd=_price(tier.teacher, baseline),
        teacher_usd=teacher_usd,
        student_usd=student_usd,
    )


def _price(prices: Prices, usage: Usage | None) -> float:
    return 0.0 if usage is None else prices.cost(usage.input_tokens, usage.output_tokens)
