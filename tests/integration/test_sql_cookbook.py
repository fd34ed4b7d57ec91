"""Every query of docs/sql.md, run through the ClickHouse endpoint over known rows, figures checked.

The rows are written the way the logger writes them (Avro records → the logger's sink → ClickHouse's row
mapping), under an agent id of this run's own: the session's ClickHouse is shared with other tests.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from services.core.clickhouse import client
from services.core.codec import AvroCodec
from services.core.records import Answer, ChatMessage, Interaction
from services.core.settings import Settings
from services.logger.sink import InteractionSink

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
AGENT = f"cookbook-{uuid.uuid4().hex[:8]}"
NOW = datetime.now(timezone.utc)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
GRACE_AT = TODAY - timedelta(days=3) + timedelta(hours=10)  # the first request
DAY2_AT = TODAY - timedelta(days=2) + timedelta(hours=10)
DAY1_AT = TODAY - timedelta(days=1) + timedelta(hours=10)
LOOKUP_ID = f"{AGENT}-shadow-agree"
PLAN_AGENT = f"{AGENT}-plan"  # plan-and-execute rows, apart so the other queries' figures stay as they are
PLAN_QUERIES = {"plan_steps"}


def queries() -> dict[str, str]:
    """The ```sql blocks of docs/sql.md by their `-- name:` line."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    named = {}
    for block in blocks:
        match = re.match(r"-- name: (\w+)\n", block)
        assert match, f"a ```sql block of {DOC.name} does not start with '-- name: <id>':\n{block[:200]}"
        assert match.group(1) not in named, f"two queries named {match.group(1)}"
        named[match.group(1)] = block
    return named


def answer(
    intent: str, latency_ms: float, *, tool: str = "lookup", args: str = '{"card": "visa"}', **kw: Any
) -> Answer:
    content = f'{{"intent": "{intent}", "tool": "{tool}", "arguments": {args}, "reply": "ok"}}'
    return Answer(**{"content": content, "model": "m", "latency_ms": latency_ms, **kw})


def row(
    name: str,
    at: datetime,
    *,
    stage: str,
    served_by: str,
    reason: str,
    teacher: Answer | None = None,
    student: Answer | None = None,
    shadow: bool = False,
    cost: float,
    baseline: float,
    conversation: str | None = None,
    intent: str | None = None,
) -> Interaction:
    served = student if served_by == "student" else teacher
    latency = served.latency_ms if served is not None and served_by != "none" else 0.0
    return Interaction(
        request_id=f"{AGENT}-{name}",
        conversation_id=conversation or f"{AGENT}-{name}",
        agent_id=AGENT,
        messages=[ChatMessage(role="user", content=f"question {name}")],
        intent=intent,
        teacher=teacher,
        student=student,
        served_by=served_by,  # type: ignore[arg-type]
        route_reason=reason,
        shadow=shadow,
        lifecycle_stage=stage,
        cost_usd=cost,
        teacher_only_cost_usd=baseline,
        received_at=at,
        responded_at=at + timedelta(milliseconds=latency + 10),  # 10 ms of routing on top of the model
    )


def seed_rows() -> list[Interaction]:
    t, s = 0.002, 0.0005  # teacher and student cost of one answer
    grace = [
        # (conversation, client intent, teacher's intent, latency): 3 conversations, 3 intents (one unlabelled
        # by the client, labelled by the teacher's answer).
        ("c1", "card_arrival", "card_arrival", 400.0),
        ("c1", "card_arrival", "card_arrival", 420.0),
        ("c2", None, "lost_card", 380.0),
        ("c3", "balance", "balance", 500.0),
    ]
    rows = [
        row(
            f"grace-{i}",
            GRACE_AT + timedelta(minutes=5 * i),
            stage="grace",
            served_by="teacher",
            reason="grace_period",
            teacher=answer(teacher_intent, latency),
            conversation=f"{AGENT}-{conv}",
            intent=client_intent,
            cost=t,
            baseline=t,
        )
        for i, (conv, client_intent, teacher_intent, latency) in enumerate(grace)
    ]
    live = {"stage": "live"}
    # Two days ago: one shadow sample, in agreement.
    rows.append(
        row(
            "shadow-day2",
            DAY2_AT,
            **live,
            served_by="student",
            reason="confident",
            shadow=True,
            teacher=answer("balance", 450.0),
            student=answer("balance", 60.0, confidence=0.95),
            cost=t + s,
            baseline=t,
        )
    )
    at = iter(DAY1_AT + timedelta(minutes=m) for m in range(60))
    # Yesterday, one hour: 6 served by the student (3 of them shadow samples), 2 low-confidence fallbacks, a
    # student failure, a canary hold-out, and a failed teacher answer.
    rows += [
        row(
            f"confident-{i}",
            next(at),
            **live,
            served_by="student",
            reason="confident",
            student=answer("balance", lat, confidence=0.9),
            cost=s,
            baseline=t,
        )
        for i, lat in enumerate((40.0, 42.0, 44.0))
    ]
    rows += [
        # Same intent, tool and arguments; key order and spacing differ.
        row("shadow-agree", next(at), **live, served_by="student", reason="confident", shadow=True,
            teacher=answer("card_arrival", 700.0, args='{"card": "visa", "when": "today"}'),
            student=answer("card_arrival", 46.0, args='{"when":"today","card":"visa"}', confidence=0.9),
            cost=t + s, baseline=t),
        # Same intent, other arguments.
        row("shadow-args", next(at), **live, served_by="student", reason="confident", shadow=True,
            teacher=answer("card_arrival", 700.0, args='{"card": "visa"}'),
            student=answer("card_arrival", 48.0, args='{"card": "amex"}', confidence=0.9),
            cost=t + s, baseline=t),
        # The student's answer is not JSON.
        row("shadow-broken", next(at), **live, served_by="student", reason="confident", shadow=True,
            teacher=answer("lost_card", 700.0),
            student=Answer(content='{"intent": "lost_card", "tool', model="m", latency_ms=50.0, confidence=0.9),
            cost=t + s, baseline=t),
        row("low-1", next(at), **live, served_by="teacher", reason="low_confidence",
            teacher=answer("balance", 600.0), student=answer("balance", 45.0, confidence=0.4), cost=t + s, baseline=t),
        row("low-2", next(at), **live, served_by="teacher", reason="low_confidence",
            teacher=answer("balance", 700.0), student=answer("balance", 45.0, confidence=0.3), cost=t + s, baseline=t),
        row("student-error", next(at), **live, served_by="teacher", reason="student_error",
            teacher=answer("balance", 450.0),
            student=Answer(model="m", latency_ms=5.0, error="model not loaded"), cost=t, baseline=t),
        row("holdout", next(at), **live, served_by="teacher", reason="canary_holdout",
            teacher=answer("balance", 410.0), cost=t, baseline=t),
        row("teacher-failed", next(at), **live, served_by="none", reason="canary_holdout",
            teacher=Answer(model="m", latency_ms=30000.0, error="timeout"), cost=0.0, baseline=0.0),
    ]  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def ch(clickhouse, settings: Settings) -> Iterator[Client]:
    codec = AvroCodec()
    records = seed_rows() + plan_rows()
    sink = InteractionSink(settings, codec=codec)
    try:
        result = sink.write([codec.encode(r) for r in records])
    finally:
        sink.close()
    assert result.written == len(records)
    conn = client(settings)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def results(ch: Client) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, sql in queries().items():
        used = set(re.findall(r"\{(\w+):\w+\}", sql))
        params = {"agent": PLAN_AGENT if name in PLAN_QUERIES else AGENT, "days": 30, "request_id": LOOKUP_ID}
        assert used <= set(params), f"{name}: unknown parameters {used - set(params)}"
        res = ch.query(sql, parameters={k: v for k, v in params.items() if k in used})
        out[name] = [dict(zip(res.column_names, r, strict=True)) for r in res.result_rows]
    return out


def hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def day(at: datetime) -> datetime:
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def test_every_query_is_checked(results: dict) -> None:
    assert set(results) == {
        "intent_diversity",
        "traffic_by_route",
        "shadow_agreement",
        "fallback_rate",
        "cost_savings",
        "latency_by_route",
        "request_by_id",
        "plan_steps",
    }, "a query was added to docs/sql.md: give it a check here"


def test_intent_diversity(results: dict) -> None:
    [got] = results["intent_diversity"]
    assert got["agent_id"] == AGENT
    assert (got["requests"], got["conversations"], got["unique_intents"]) == (4, 3, 3)
    assert utc(got["first_seen"]) == GRACE_AT
    elapsed = (datetime.now(timezone.utc) - GRACE_AT).total_seconds() / 86400
    assert got["days_elapsed"] == pytest.approx(elapsed, abs=0.011)
    assert not got["grace_complete"]


def test_traffic_by_route(results: dict) -> None:
    got = [
        (utc(r["hour"]), r["served_by"], r["route_reason"], r["requests"], r["share"])
        for r in results["traffic_by_route"]
    ]
    assert got == [
        (hour(GRACE_AT), "teacher", "grace_period", 4, 1.0),
        (hour(DAY2_AT), "student", "confident", 1, 1.0),
        (hour(DAY1_AT), "student", "confident", 6, round(6 / 11, 4)),
        (hour(DAY1_AT), "teacher", "low_confidence", 2, round(2 / 11, 4)),
        (hour(DAY1_AT), "none", "canary_holdout", 1, round(1 / 11, 4)),
        (hour(DAY1_AT), "teacher", "canary_holdout", 1, round(1 / 11, 4)),
        (hour(DAY1_AT), "teacher", "student_error", 1, round(1 / 11, 4)),
    ]


def test_shadow_agreement(results: dict) -> None:
    got = [
        (utc(r["day"]), r["shadow_samples"], r["agreed"], r["agreement"], r["intent_agreement"])
        for r in results["shadow_agreement"]
    ]
    assert got == [
        (day(DAY2_AT), 1, 1, 1.0, 1.0),
        # agree (key order and spacing differ), other arguments (same intent), broken JSON
        (day(DAY1_AT), 3, 1, round(1 / 3, 4), round(2 / 3, 4)),
    ]


def test_fallback_rate(results: dict) -> None:
    got = [
        (utc(r["hour"]), r["student_eligible"], r["low_confidence"], r["student_errors"], r["fallback_rate"])
        for r in results["fallback_rate"]
    ]
    assert got == [
        (hour(DAY2_AT), 1, 0, 0, 0.0),
        # 6 student-served + 2 low-confidence + 1 student error; the hold-outs never asked the student
        (hour(DAY1_AT), 9, 2, 1, round(2 / 9, 4)),
    ]


def test_cost_savings(results: dict) -> None:
    got = {utc(r["day"]): r for r in results["cost_savings"]}
    assert list(got) == [day(GRACE_AT), day(DAY2_AT), day(DAY1_AT)]
    grace, day2, day1 = got.values()
    assert (grace["requests"], grace["actual_usd"], grace["teacher_only_usd"], grace["savings_usd"]) == (
        4,
        0.008,
        0.008,
        0.0,
    )
    assert (day2["actual_usd"], day2["teacher_only_usd"], day2["savings_share"]) == (0.0025, 0.002, -0.25)
    # 3 x student 0.0005 + 3 shadows and 2 fallbacks x 0.0025 + 2 teacher-only x 0.002 + a failure at 0
    assert day1["requests"] == 11
    assert day1["actual_usd"] == pytest.approx(0.018)
    assert day1["teacher_only_usd"] == pytest.approx(0.02)
    assert day1["savings_usd"] == pytest.approx(0.002) and day1["savings_share"] == pytest.approx(0.1)


def test_latency_by_route(results: dict) -> None:
    got = {(r["served_by"], r["route_reason"]): r for r in results["latency_by_route"]}
    assert set(got) == {
        ("teacher", "grace_period"),
        ("student", "confident"),
        ("teacher", "low_confidence"),
        ("teacher", "student_error"),
        ("teacher", "canary_holdout"),
    }  # the failed answer (served_by none) is left out
    # quantile interpolates linearly between ranks: p95 of n sorted values sits at rank 0.95 * (n - 1).
    assert (got[("teacher", "grace_period")]["p50_ms"], got[("teacher", "grace_period")]["p95_ms"]) == (410.0, 488.0)
    student = got[("student", "confident")]  # 40 42 44 46 48 50 60: the student's latency, not the shadow's
    assert (student["requests"], student["p50_ms"], student["p95_ms"]) == (7, 46.0, 57.0)
    assert student["p95_end_to_end_ms"] == pytest.approx(67.0, abs=0.05)
    fallback = got[("teacher", "low_confidence")]  # served by the teacher: its latency
    assert (fallback["requests"], fallback["p95_ms"]) == (2, 695.0)
    assert got[("teacher", "canary_holdout")]["requests"] == 1


def test_request_by_id(results: dict) -> None:
    [got] = results["request_by_id"]
    assert (got["request_id"], got["served_by"], got["route_reason"]) == (LOOKUP_ID, "student", "confident")
    assert got["user_text"] == "question shadow-agree" and got["student_confidence"] == pytest.approx(0.9)


# Plan-and-execute (docs/plan-execute.md) ------------------------------------------------------------------
def plan_rows() -> list[Interaction]:
    """Three planned requests under PLAN_AGENT: two plans of two steps, and a refused plan answered directly."""
    t, s, p = 0.002, 0.0005, 0.003  # a teacher answer, a student answer, a plan

    def planned(name: str, plan: str, step: int | None, **kw: Any) -> Interaction:
        rec = row(name, DAY1_AT, stage="live", **kw)
        meta = {"plan_id": plan, "step_count": "2"}
        if step is not None:
            meta |= {"step_index": str(step), "step": f"do part {step}"}
        return rec.model_copy(update={"agent_id": PLAN_AGENT, "metadata": meta})

    plan = {"served_by": "teacher", "reason": "plan", "teacher": answer("plan", 300.0), "cost": p, "baseline": p}
    return [
        planned("p1", "p1", None, **plan),
        planned("p1-s0", "p1", 0, served_by="student", reason="confident", shadow=True,
                teacher=answer("card", 400.0), student=answer("card", 50.0, confidence=0.9), cost=t + s, baseline=t),
        planned("p1-s1", "p1", 1, served_by="student", reason="confident",
                student=answer("how", 50.0, confidence=0.9), cost=s, baseline=t),
        planned("p2", "p2", None, **plan),
        planned("p2-s0", "p2", 0, served_by="student", reason="confident", shadow=True,
                teacher=answer("card", 400.0), student=answer("pin", 50.0, confidence=0.9), cost=t + s, baseline=t),
        planned("p2-s1", "p2", 1, served_by="teacher", reason="low_confidence",
                teacher=answer("how", 400.0), student=answer("how", 50.0, confidence=0.2), cost=t + s, baseline=t),
        planned("p3", "p3", None, served_by="none", reason="plan_invalid", teacher=answer("plan", 300.0),
                cost=0.001, baseline=0.001),
        planned("p3-direct", "p3", None, served_by="teacher", reason="plan_fallback",
                teacher=answer("card+how", 400.0), cost=t, baseline=t),
    ]  # fmt: skip


def test_plan_steps(results: dict) -> None:
    got = [
        (r["step"], r["executions"], r["by_student"], r["by_teacher"], r["cost_usd"], r["shadow_samples"],
         r["agreed"], r["agreement"])
        for r in results["plan_steps"]
    ]  # fmt: skip
    assert got == [
        ("plan", 3, 0, 2, 0.007, 0, 0, None),  # two plans and a refused one (served_by none)
        ("0", 2, 2, 0, 0.005, 2, 1, 0.5),  # one shadow sample agrees, one names another intent
        ("1", 2, 1, 1, 0.003, 0, 0, None),
        ("direct", 1, 0, 1, 0.002, 0, 0, None),
    ]
