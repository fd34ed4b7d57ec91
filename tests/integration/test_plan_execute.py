"""Plan-and-execute on the real local stack: the router and the logger run as processes, the reference teacher
serves plans and steps over HTTP, a tiny student serves steps from Triton. A request goes in through the
client; one response comes back with every step; ClickHouse holds the plan's row and one row per step, whose
costs add up to the request's, and the cookbook's per-step query (docs/sql.md) reads them."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import yaml

from services.core.records import ChatMessage, InferenceRequest
from services.core.settings import Settings
from services.router.plan import plan_messages
from services.teacher.reference import ReferenceTeacher
from tests.integration.test_router import promote, rows, send_all, wait_rows
from tests.integration.test_sql_cookbook import queries

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
PLANNER = f"planner-{RUN}"  # in its grace period: the teacher serves every step
PLANNER_LIVE = f"planner-live-{RUN}"  # a promoted student serves every step, each shadowed by the teacher
PLANNER_AGENTS = {
    PLANNER: {},
    PLANNER_LIVE: {"routing": {"canary_steps": [1.0], "shadow_rate": 1.0}},
}


@pytest.fixture(scope="module")
def serving(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory) -> Settings:
    """Router and logger processes with this module's plan-and-execute agents (NLU++ teacher)."""
    from tests.conftest import start_services

    agents_file = tmp_path_factory.mktemp("plan-agents") / "agents.yaml"
    base = {"teacher": {"model": "reference/nlupp"}, "execution": {"mode": "plan_and_execute", "max_steps": 6}}
    agents_file.write_text(yaml.safe_dump({"agents": {a: {**base, **cfg} for a, cfg in PLANNER_AGENTS.items()}}))
    svc_settings = settings.model_copy(update={"agents_file": agents_file})
    start_services(stack_manager, svc_settings)
    return svc_settings


@pytest.fixture(scope="module")
def messages(settings: Settings) -> list[tuple[str, list[str]]]:
    """NLU++ messages of two and three intents whose plan and steps the session's teacher serves unflawed (its
    flaws are drawn from the text: the in-process teacher with the same settings says which), with the step
    intents each plan will have."""
    reference = ReferenceTeacher.from_settings(settings)
    model = "reference/nlupp"
    chosen: list[tuple[str, list[str]]] = []
    for ex in reference.workload(model).examples("test"):
        if len(ex.intents) not in (2, 3) or reference.answer(model, ex.text, flaws=False).example is not ex:
            continue
        chat = [(m.role, m.content) for m in plan_messages([ChatMessage(role="user", content=ex.text)], 6)]
        plan = reference.answer_chat(model, chat)
        steps = json.loads(plan.content)["steps"] if plan.flaw is None else []
        if steps and all(reference.answer(model, s["instruction"]).flaw is None for s in steps):
            chosen.append((ex.text, [s["intent"] for s in steps]))
        if len(chosen) == 4:
            return chosen
    raise AssertionError("no unflawed NLU++ messages found")


def request(agent: str, text: str) -> InferenceRequest:
    return InferenceRequest(
        conversation_id=uuid.uuid4().hex,
        agent_id=agent,
        messages=[
            ChatMessage(role="system", content="You route banking requests."),
            ChatMessage(role="user", content=text),
        ],
        metadata={"source": "test_plan_execute"},
    )


def plan_of(settings: Settings, plan_id: str) -> list[dict]:
    sql = (
        "SELECT request_id, route_reason, served_by, shadow, teacher_ran, student_ran, training_candidate, "
        "metadata, cost_usd, teacher_finish_reason, user_text FROM interactions FINAL "
        "WHERE metadata['plan_id'] = {p:String} ORDER BY request_id"
    )
    names = sql.split("SELECT ")[1].split(" FROM")[0].split(", ")
    return [dict(zip(names, r, strict=True)) for r in rows(settings, sql, p=plan_id)]


def per_step(settings: Settings, agent: str) -> dict[str, dict]:
    """The cookbook's plan_steps query (docs/sql.md), by step."""
    sql = queries()["plan_steps"]
    ch_rows = rows(settings, sql, agent=agent, days=1)
    names = ["agent_id", "step", "executions", "by_student", "by_teacher", "cost_usd", "teacher_only_usd",
             "shadow_samples", "agreed", "agreement"]  # fmt: skip
    return {r[1]: dict(zip(names, r, strict=True)) for r in ch_rows}


async def test_without_a_student_the_teacher_plans_and_serves_every_step(
    serving: Settings, messages: list[tuple[str, list[str]]]
) -> None:
    reqs = [request(PLANNER, text) for text, _ in messages]
    responses = await send_all(serving, reqs)
    # One response per request, with every step of its plan, in order.
    assert len(responses) == len(reqs)
    for req, resp, (_, intents) in zip(reqs, responses, messages, strict=True):
        assert resp.request_id == req.request_id and resp.error is None and resp.served_by == "teacher"
        steps = json.loads(resp.content)["steps"]
        assert [s["index"] for s in steps] == list(range(len(intents)))
        assert [s["answer"]["intent"] for s in steps] == intents  # each step answered for its own intent
        assert all(s["served_by"] == "teacher" for s in steps)
    total_rows = sum(1 + len(intents) for _, intents in messages)
    wait_rows(serving, PLANNER, total_rows)
    for req, resp, (text, intents) in zip(reqs, responses, messages, strict=True):
        got = plan_of(serving, req.request_id)
        assert len(got) == 1 + len(intents), got
        plan_row, steps = got[0], got[1:]  # the plan's id sorts before "<id>:step:<n>"
        assert (plan_row["request_id"], plan_row["route_reason"], plan_row["served_by"]) == (
            req.request_id,
            "plan",
            "teacher",
        )
        assert plan_row["training_candidate"] is False and plan_row["metadata"]["step_count"] == str(len(intents))
        assert plan_row["user_text"] == text and plan_row["teacher_finish_reason"] == "stop"
        assert [s["metadata"]["step_index"] for s in steps] == [str(i) for i in range(len(intents))]
        assert [s["metadata"]["step_intent"] for s in steps] == intents
        assert all(s["metadata"]["source"] == "test_plan_execute" for s in steps)  # the client's metadata kept
        assert {(s["route_reason"], s["served_by"], s["training_candidate"]) for s in steps} == {
            ("grace_period", "teacher", True)
        }
        assert [s["user_text"] for s in steps] == [s["metadata"]["step"] for s in steps]
        # The request's cost is the plan's plus every step's.
        assert sum(r["cost_usd"] for r in got) == pytest.approx(resp.cost_usd, rel=1e-9)
    by_step = per_step(serving, PLANNER)
    assert by_step["plan"]["executions"] == len(messages)
    assert by_step["0"]["executions"] == len(messages) and by_step["0"]["by_teacher"] == len(messages)
    assert by_step["0"]["shadow_samples"] == 0 and by_step["0"]["agreement"] is None
    assert sum(s["cost_usd"] for s in by_step.values()) == pytest.approx(sum(r.cost_usd for r in responses), abs=1e-5)


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    from tests.helpers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-student"))


async def test_a_live_student_serves_the_steps_and_shadows_give_agreement_per_step(
    serving: Settings, messages: list[tuple[str, list[str]]], tiny_student: Path
) -> None:
    await promote(serving, PLANNER_LIVE, tiny_student, threshold=0.0)
    await asyncio.sleep(2)  # the router follows flywheel.models
    chosen = messages[:2]
    reqs = [request(PLANNER_LIVE, text) for text, _ in chosen]
    responses = await send_all(serving, reqs)
    for resp, (_, intents) in zip(responses, chosen, strict=True):
        assert resp.error is None and resp.served_by == "student" and resp.model_version
        steps = json.loads(resp.content)["steps"]
        assert len(steps) == len(intents) and all(s["served_by"] == "student" for s in steps)
    n_steps = sum(len(intents) for _, intents in chosen)
    wait_rows(serving, PLANNER_LIVE, len(chosen) + n_steps)
    for req, resp in zip(reqs, responses, strict=True):
        got = plan_of(serving, req.request_id)
        plan_row, steps = got[0], got[1:]
        assert (plan_row["route_reason"], plan_row["student_ran"]) == ("plan", False)  # the teacher plans
        # Every step: the student served it and the teacher shadowed it (shadow rate 1.0), same rules as direct.
        assert {(s["route_reason"], s["served_by"], s["shadow"], s["teacher_ran"]) for s in steps} == {
            ("confident", "student", True, True)
        }
        assert sum(r["cost_usd"] for r in got) == pytest.approx(resp.cost_usd, rel=1e-9)
    by_step = per_step(serving, PLANNER_LIVE)
    assert by_step["0"]["by_student"] == len(chosen) and by_step["0"]["shadow_samples"] == len(chosen)
    for step, figures in by_step.items():
        if step != "plan":
            assert figures["shadow_samples"] == figures["executions"] and 0.0 <= figures["agreement"] <= 1.0
