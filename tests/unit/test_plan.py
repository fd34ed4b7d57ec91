"""Plan-and-execute: the pure plan logic (``services.router.plan``: the planning request, the plan's validation,
the step requests, the combined answer and its cost), the agent config field, and the router's plan path over
the in-process reference teacher (no Kafka; the student, where asked, is a real client with nothing behind it)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timezone

import pytest

from services.core.agents import AgentConfigError, load_agents, parse_agents
from services.core.records import ChatMessage, InferenceRequest, ModelEvent, ToolCall
from services.core.settings import REPO_ROOT, Settings
from services.core.student import StudentClient
from services.router import routing
from services.router.plan import (
    PLAN_MARKER,
    ExecutionPlan,
    PlanError,
    Step,
    StepResult,
    combine,
    is_plan_request,
    parse_plan,
    plan_messages,
    step_request,
)
from services.router.service import Router
from services.teacher.reference import ReferenceTeacher

TOOLS = ("card_block", "card_services", "general_support")
INTENTS = ("lost_stolen", "card", "how")
GOOD = {
    "steps": [
        {"instruction": "Block the lost card", "intent": "lost_stolen", "tool": "card_block"},
        {"instruction": "Say how to order a new one", "intent": "how", "tool": "general_support"},
    ]
}


def request(text: str = "I lost my card, how do I get a new one?", **kw) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-1",
        conversation_id="conv-1",
        agent_id="planner",
        messages=[ChatMessage(role="system", content="Answer in JSON."), ChatMessage(role="user", content=text)],
        metadata={"channel": "web"},
        **kw,
    )


# The planning request ----------------------------------------------------------------------------------------
def test_plan_messages_add_the_marked_prompt_after_the_agents_system_messages() -> None:
    msgs = plan_messages(request().messages, max_steps=4)
    assert [m.role for m in msgs] == ["system", "system", "user"]
    assert msgs[0].content == "Answer in JSON."  # the agent's contract stays first
    assert msgs[1].content.startswith(PLAN_MARKER) and "at most 4" in msgs[1].content
    assert '{"steps": [{"instruction"' in msgs[1].content
    assert is_plan_request([(m.role, m.content) for m in msgs])
    assert not is_plan_request([(m.role, m.content) for m in request().messages])
    assert not is_plan_request([("user", PLAN_MARKER + " a user cannot ask for a plan")])
    no_system = plan_messages([ChatMessage(role="user", content="hi")], 2)
    assert [m.role for m in no_system] == ["system", "user"]


# The plan's validation ---------------------------------------------------------------------------------------
def test_a_good_plan_parses() -> None:
    plan = parse_plan(json.dumps(GOOD), max_steps=6, valid_tools=TOOLS, valid_intents=INTENTS)
    assert plan.steps == (
        Step("Block the lost card", "lost_stolen", "card_block"),
        Step("Say how to order a new one", "how", "general_support"),
    )
    # A bare list, a Markdown fence, and steps without intent/tool are accepted too.
    bare = parse_plan(json.dumps(GOOD["steps"]), max_steps=6)
    assert bare == plan
    fenced = parse_plan("```json\n" + json.dumps(GOOD) + "\n```", max_steps=6)
    assert fenced == plan
    assert parse_plan('[{"instruction": " just do it "}]', max_steps=1).steps == (Step("just do it"),)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "plan is empty"),
        ("  ", "plan is empty"),
        ('{"steps": [{"instruction": "Block', "not valid JSON"),
        ("{'steps': []}", "not valid JSON"),
        ('{"plan": []}', "no 'steps' list"),
        ('{"steps": "block the card"}', "'steps' must be a list"),
        ('{"steps": []}', "has no steps"),
        (json.dumps({"steps": [{"instruction": f"s{i}"} for i in range(7)]}), "7 steps, more than .*max_steps 6"),
        ('{"steps": ["block the card"]}', "step 0: must be an object"),
        ('{"steps": [{"intent": "card"}]}', "step 0: 'instruction' must be a non-empty string"),
        ('{"steps": [{"instruction": "a"}, {"instruction": "b", "tool": 3}]}', "step 1: 'tool' must be a string"),
        ('{"steps": [{"instruction": "a", "tool": "card_block_v2"}]}', "unknown tool 'card_block_v2'"),
        ('{"steps": [{"instruction": "a", "intent": "weather"}]}', "unknown intent 'weather'"),
    ],
)
def test_a_bad_plan_is_refused_with_a_clear_error(content: str | None, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        parse_plan(content, max_steps=6, valid_tools=TOOLS, valid_intents=INTENTS)


def test_names_are_not_checked_without_a_contract() -> None:
    plan = parse_plan('{"steps": [{"instruction": "a", "intent": "anything", "tool": "any_tool"}]}', max_steps=6)
    assert plan.steps[0] == Step("a", "anything", "any_tool")


# The steps ---------------------------------------------------------------------------------------------------
def test_a_step_is_a_request_of_its_own() -> None:
    req = request(tools='[{"type": "function", "function": {"name": "card_block"}}]', intent="client_label")
    plan = ExecutionPlan((Step("Block the lost card", "lost_stolen", "card_block"), Step("Say how", None, None)))
    first, second = step_request(req, plan, 0), step_request(req, plan, 1)
    assert (first.request_id, second.request_id) == ("req-1:step:0", "req-1:step:1")
    # The agent's system messages and the instruction; not the client's whole message.
    assert [(m.role, m.content) for m in first.messages] == [
        ("system", "Answer in JSON."),
        ("user", "Block the lost card"),
    ]
    assert first.metadata == {
        "channel": "web",
        "plan_id": "req-1",
        "step_index": "0",
        "step_count": "2",
        "step": "Block the lost card",
        "step_intent": "lost_stolen",
        "step_tool": "card_block",
    }
    assert "step_intent" not in second.metadata and second.metadata["step_index"] == "1"
    assert first.tools == req.tools and first.intent is None  # the client's label was for the whole request
    assert (first.conversation_id, first.agent_id, first.created_at) == ("conv-1", "planner", req.created_at)


def test_each_step_is_routed_by_the_direct_rules() -> None:
    """The same decision per step as for a direct request: a live student serves the confident steps, the
    teacher the unsure ones; the canary and shadow draws are made per step."""
    live = routing.AgentView("auto", "live", True, 0.85, shadow_rate=0.0, canary_share=1.0)
    decisions = []
    for confidence in (0.95, 0.4, None):
        first = routing.plan(live, u_canary=0.5)
        assert first.ask_student and first.reason == routing.CONFIDENT
        after = routing.after_student(live, confidence, confidence is None, u_shadow=0.9)
        decisions.append((after.served_by, after.reason))
    assert decisions == [
        ("student", routing.CONFIDENT),
        ("teacher", routing.LOW_CONFIDENCE),
        ("teacher", routing.STUDENT_ERROR),
    ]
    grace = routing.AgentView("auto", "grace", False, 0.85, shadow_rate=0.0, canary_share=1.0)
    assert routing.plan(grace, 0.5) == routing.Plan(False, routing.GRACE_PERIOD)


# The combined answer -----------------------------------------------------------------------------------------
def result(index: int, served_by: str = "teacher", **kw) -> StepResult:
    base = {
        "index": index,
        "instruction": f"step {index}",
        "served_by": served_by,
        "content": json.dumps({"intent": f"i{index}", "tool": "t", "arguments": {}, "reply": "ok"}),
        "cost_usd": 0.001 * (index + 1),
    }
    return StepResult(**{**base, **kw})


def test_the_combined_answer_lists_every_step_in_order() -> None:
    calls = (ToolCall(id="call_0", name="card_block", arguments="{}"),)
    got = combine(0.0005, [result(1, content="plain text"), result(0, tool_calls=calls)])
    body = json.loads(got.content)
    assert [s["index"] for s in body["steps"]] == [0, 1]
    assert body["steps"][0] == {
        "index": 0,
        "instruction": "step 0",
        "served_by": "teacher",
        "answer": {"intent": "i0", "tool": "t", "arguments": {}, "reply": "ok"},
    }
    assert body["steps"][1]["answer"] == "plain text"  # not JSON: kept as text
    assert [(c.id, c.name) for c in got.tool_calls] == [("s0_call_0", "card_block")]
    assert got.served_by == "teacher" and got.error is None
    assert got.confidence is None and got.model_version is None


def test_the_request_costs_the_plan_plus_every_step() -> None:
    got = combine(0.0005, [result(0), result(1), result(2)])
    assert got.cost_usd == pytest.approx(0.0005 + 0.001 + 0.002 + 0.003)
    assert combine(0.0, []).cost_usd == 0.0


def test_who_served_a_combined_answer() -> None:
    student = {"served_by": "student", "confidence": 0.9, "model_version": "3"}
    all_student = combine(0.0, [result(0, **student), result(1, **{**student, "confidence": 0.7})])
    assert (all_student.served_by, all_student.confidence, all_student.model_version) == ("student", 0.7, "3")
    mixed = combine(0.0, [result(0, **student), result(1)])
    assert (mixed.served_by, mixed.confidence, mixed.model_version) == ("teacher", None, None)
    failed = combine(0.0, [result(0, served_by="none", content=None, error="HTTP 503")])
    assert failed.served_by == "none" and failed.error == "1 of 1 plan steps failed: step 0: HTTP 503"
    partial = combine(0.0, [result(0), result(1, served_by="none", content=None, error="timeout")])
    assert partial.served_by == "teacher" and "step 1: timeout" in (partial.error or "")
    assert json.loads(partial.content)["steps"][1] == {
        "index": 1,
        "instruction": "step 1",
        "served_by": "none",
        "error": "timeout",
    }


# The agent config field ----------------------------------------------------------------------------------------
def test_execution_defaults_to_direct_and_is_validated() -> None:
    agents = parse_agents({"agents": {"a": {}, "p": {"execution": {"mode": "plan_and_execute", "max_steps": 3}}}})
    assert agents.agent("a").execution.mode == "direct" and agents.agent("a").execution.max_steps == 6
    assert agents.agent("p").execution.mode == "plan_and_execute" and agents.agent("p").execution.max_steps == 3
    for bad, named in (
        ({"mode": "tree_of_thought"}, "agents.a.execution.mode"),
        ({"max_steps": 0}, "agents.a.execution.max_steps"),
        ({"steps": 3}, "agents.a.execution.steps"),
    ):
        with pytest.raises(AgentConfigError, match=named):
            parse_agents({"agents": {"a": {"execution": bad}}})


def test_the_shipped_planner_agent() -> None:
    agents = load_agents(REPO_ROOT / "agents.yaml")
    planner = agents.agent("banking-planner")
    assert planner.execution.mode == "plan_and_execute" and planner.teacher.model == "reference/nlupp"
    assert planner.tier == "cost-optimized"
    assert planner.output == agents.agent("banking-nlu").output
    assert agents.agent("banking-nlu").execution.mode == "direct"
    assert agents.agent("support-bot").execution.mode == "direct"


# The router's plan path, in process ----------------------------------------------------------------------------
NLU_TEXT = "block my card cause I can't find it for last 3 hours"  # NLU++: cancel_close_leave_freeze+card+lost_stolen


def router(teacher: ReferenceTeacher, **execution: object) -> Router:
    agents = load_agents(REPO_ROOT / "agents.yaml")
    planner = agents.agent("banking-planner")
    if execution:
        changed = planner.model_copy(update={"execution": planner.execution.model_copy(update=execution)})
        agents = agents.model_copy(update={"agents": {**agents.agents, "banking-planner": changed}})
    # Nothing listens at port 1: a student, when asked, fails at once (student_error, the teacher answers).
    return Router(Settings(), agents, {"": teacher}, StudentClient("127.0.0.1:1", timeout_s=5), rng=random.Random(0))


def nlu_request(text: str = NLU_TEXT) -> InferenceRequest:
    return InferenceRequest(
        conversation_id="c", agent_id="banking-planner", messages=[ChatMessage(role="user", content=text)]
    )


@pytest.fixture(scope="module")
def teacher() -> ReferenceTeacher:
    return ReferenceTeacher.from_data_dir(REPO_ROOT / "data", flaw_rate=0.0)


def serve(r: Router, req: InferenceRequest):
    return asyncio.run(r.serve(req, datetime.now(timezone.utc)))


def test_router_plans_then_serves_every_step_with_the_teacher_in_grace(teacher: ReferenceTeacher) -> None:
    req = nlu_request()
    out = serve(router(teacher), req)
    plan_row, steps = out.interaction, out.steps
    assert (plan_row.request_id, plan_row.route_reason, plan_row.served_by) == (req.request_id, "plan", "teacher")
    assert plan_row.training_candidate is False and plan_row.metadata["step_count"] == "3"
    assert plan_row.messages[0].content.startswith(PLAN_MARKER) and plan_row.tools is None
    assert [s.metadata["step_index"] for s in steps] == ["0", "1", "2"]
    assert [s.metadata["step_intent"] for s in steps] == ["lost_stolen", "card", "cancel_close_leave_freeze"]
    assert {(s.served_by, s.route_reason, s.training_candidate) for s in steps} == {("teacher", "grace_period", True)}
    assert all(s.metadata["plan_id"] == req.request_id for s in steps)
    answers = [json.loads(s.teacher.content) for s in steps]  # each step answered for its one intent
    assert [a["intent"] for a in answers] == ["lost_stolen", "card", "cancel_close_leave_freeze"]
    assert answers[0]["tool"] == "card_block" and answers[0]["arguments"] == {"time_period": "last 3 hours"}
    body = json.loads(out.response.content)
    assert [s["answer"] for s in body["steps"]] == answers
    assert out.response.served_by == "teacher" and out.response.error is None
    assert out.response.request_id == req.request_id
    assert out.response.cost_usd == pytest.approx(plan_row.cost_usd + sum(s.cost_usd for s in steps))
    assert plan_row.cost_usd > 0 and all(s.cost_usd > 0 for s in steps)


def test_a_bad_plan_is_recorded_and_the_teacher_answers_directly(teacher: ReferenceTeacher) -> None:
    # A token limit that cuts the plan (longer than an answer) but not the direct answer.
    direct_tokens = -(-len(teacher.answer("reference/nlupp", NLU_TEXT, flaws=False).content) // 4)
    cut = router(teacher)
    planner = cut.agents.agent("banking-planner")
    limited = planner.model_copy(update={"teacher": planner.teacher.model_copy(update={"max_tokens": direct_tokens})})
    cut.agents = cut.agents.model_copy(update={"agents": {**cut.agents.agents, "banking-planner": limited}})
    req = nlu_request()
    out = serve(cut, req)
    plan_row, (direct,) = out.interaction, out.steps
    assert (plan_row.route_reason, plan_row.served_by) == ("plan_invalid", "none")
    assert "cut off" in plan_row.metadata["plan_error"] and plan_row.teacher.finish_reason == "length"
    assert (direct.request_id, direct.route_reason, direct.served_by) == (
        f"{req.request_id}:direct",
        "plan_fallback",
        "teacher",
    )
    assert direct.metadata["plan_id"] == req.request_id and "step_index" not in direct.metadata
    assert json.loads(out.response.content)["intent"] == "cancel_close_leave_freeze+card+lost_stolen"
    assert out.response.served_by == "teacher" and out.response.request_id == req.request_id
    assert out.response.cost_usd == pytest.approx(plan_row.cost_usd + direct.cost_usd)


def test_too_many_steps_fall_back_too(teacher: ReferenceTeacher) -> None:
    out = serve(router(teacher, max_steps=2), nlu_request())
    assert out.interaction.route_reason == "plan_invalid"
    assert "3 steps, more than execution.max_steps 2" in out.interaction.metadata["plan_error"]
    assert [s.route_reason for s in out.steps] == ["plan_fallback"]


def test_with_a_student_promoted_each_step_asks_it_first(teacher: ReferenceTeacher) -> None:
    r = router(teacher)
    r.state.apply_lifecycle(
        ModelEvent(agent_id="banking-planner", kind="promoted", model_name="student_banking-planner", model_version=1)
    )
    r.state.runtime["banking-planner"].eligible_since_promotion = 10_000  # past the canary ramp: all steps
    out = serve(r, nlu_request())
    assert out.interaction.route_reason == "plan" and out.interaction.student is None  # the plan: teacher only
    # Every step asked the student (nothing at port 1), then fell back to the teacher, one decision per step.
    assert [(s.route_reason, s.served_by) for s in out.steps] == [("student_error", "teacher")] * 3
    assert all(s.student is not None and s.student.error for s in out.steps)
    assert out.response.served_by == "teacher" and out.response.error is None
