"""The reference teacher's logic (no HTTP): answers from the data sets' gold labels, nearest neighbours for
unseen messages, the flaw model (rates, determinism, what each kind looks like), the output contract and its
schema, the latency model, and the stack component's checks."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from services.core.records import ChatMessage
from services.core.settings import REPO_ROOT
from services.stack.process import StackError, free_port
from services.teacher.base import Teacher, TeacherError
from services.teacher.contract import Workload, nlupp_label
from services.teacher.reference import (
    FLAW_KINDS,
    HEDGE_PHRASES,
    ReferenceTeacher,
    UnknownModel,
    flaw_for,
    normalise,
)
from services.teacher.tables import BANKING77_REPLIES, BANKING77_TOOLS, NLUPP_REPLIES, NLUPP_TOOLS, banking77_arguments
from services.teacher.workloads import load_workload, load_workloads

DATA = REPO_ROOT / "data"
B77 = "reference/banking77"
NLUPP = "reference/nlupp"


@pytest.fixture(scope="module")
def workloads() -> dict[str, Workload]:
    return load_workloads(DATA)


@pytest.fixture(scope="module")
def clean(workloads: dict[str, Workload]) -> ReferenceTeacher:
    return ReferenceTeacher(workloads, flaw_rate=0.0)


@pytest.fixture(scope="module")
def flawed(workloads: dict[str, Workload]) -> ReferenceTeacher:
    return ReferenceTeacher(workloads, flaw_rate=0.3, seed=7)


# The contract and the tool tables ------------------------------------------------------------------------------


def test_data_sets_are_read_with_their_splits(workloads: dict[str, Workload]) -> None:
    b77, nlupp = workloads["banking77"], workloads["nlupp"]
    assert (len(b77.examples("train")), len(b77.examples("test"))) == (10003, 3080)
    assert len(b77.intents) == 77 and len(nlupp.intents) == 49  # 48 annotated intents + "inform"
    assert len(nlupp.examples("train")) + len(nlupp.examples("test")) == len(nlupp.examples()) == 2071
    assert 0.15 < len(nlupp.examples("test")) / len(nlupp.examples()) < 0.25
    with pytest.raises(ValueError, match="unknown split"):
        b77.examples("dev")
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("atis", DATA)


@pytest.mark.parametrize("name", ["banking77", "nlupp"])
def test_every_intent_maps_to_exactly_one_listed_tool(workloads: dict[str, Workload], name: str) -> None:
    w = workloads[name]
    table = BANKING77_TOOLS if name == "banking77" else NLUPP_TOOLS
    listed = [i for intents in table.values() for i in intents]
    assert len(listed) == len(set(listed)), "an intent is listed under two tools"
    assert sorted(listed) == sorted(w.intents)
    assert 10 <= len(w.tools) <= 15
    for intent in w.intents:
        assert w.tool_for_intent(intent) in w.tools
        assert w.reply_for(intent)
    assert all(any(w.tool_for_intent(i) == t for i in w.intents) for t in w.tools), "a tool no intent reaches"
    assert set(BANKING77_REPLIES) == set(workloads["banking77"].intents)


def test_nlupp_tool_is_chosen_by_the_highest_ranked_intent(workloads: dict[str, Workload]) -> None:
    w = workloads["nlupp"]
    assert w.tool_for_intent("card+lost_stolen") == "card_block"  # a lost card is a block, whatever else
    assert w.tool_for_intent("card+fees_interests") == "fees_and_limits"
    assert w.tool_for_intent("request_info+transfer_payment_deposit") == "payments_transfers"
    assert w.tool_for_intent("greet") == "conversation"
    assert w.tool_for_intent("inform") == "conversation"
    assert nlupp_label(["pin", "card", "pin"]) == "card+pin" and nlupp_label([]) == "inform"
    with pytest.raises(KeyError):
        w.tool_for_intent("check_in")  # a hotel intent is outside the banking workload


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Why is there an extra £1 charge on my statement?", {"amount": "1", "currency": "GBP"}),
        ("I was charged 20 euros twice", {"amount": "20", "currency": "EUR"}),
        ("I sent $1,250.50 to my sister", {"amount": "1250.50", "currency": "USD"}),
        ("Transfer of 100 GBP still pending", {"amount": "100", "currency": "GBP"}),
        ("What is the exchange rate for EUR?", {"currency": "EUR"}),
        ("My card has not arrived after 2 weeks", {}),
    ],
)
def test_banking77_arguments_are_read_from_the_text(text: str, expected: dict[str, str]) -> None:
    assert banking77_arguments(text) == expected


@pytest.mark.parametrize("name", ["banking77", "nlupp"])
def test_unflawed_answers_fit_the_contract_and_its_schema(workloads: dict[str, Workload], name: str) -> None:
    w = workloads[name]
    teacher = ReferenceTeacher({name: w}, flaw_rate=0.0)
    schema = w.output_schema()
    assert schema["properties"]["tool"]["enum"] == w.tools
    contents = [teacher.answer(f"reference/{name}", ex.text).content for ex in w.examples()]
    for content in contents:
        assert w.check_output(content) == [], content
    jsonschema = pytest.importorskip("jsonschema")  # not a project dependency; present on most machines
    validator = jsonschema.Draft202012Validator(schema)
    for content in contents[::5]:  # the full schema check is slower; a fifth of the examples is plenty
        validator.validate(json.loads(content))


def test_output_schema_narrows_to_an_agents_intents(workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    schema = w.output_schema(["card_arrival", "lost_or_stolen_card", "compromised_card"])
    assert schema["properties"]["intent"]["enum"] == ["card_arrival", "lost_or_stolen_card", "compromised_card"]
    assert schema["properties"]["tool"]["enum"] == ["card_delivery_status", "card_block"]
    with pytest.raises(ValueError, match="unknown intents"):
        w.output_schema(["not_an_intent"])


def test_check_output_names_the_problem(workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    assert "not valid JSON" in w.check_output('{"intent": "card_arrival", "tool"')[0]
    bad_tool = {"intent": "card_arrival", "tool": "track_parcel", "arguments": {}, "reply": "Ok."}
    assert w.check_output(json.dumps(bad_tool)) == ["invalid tool 'track_parcel'"]
    assert w.check_output(json.dumps({**bad_tool, "tool": "card_delivery_status", "intent": "x"})) == [
        "unknown intent 'x'"
    ]
    assert w.check_output(None) == ["no content"]


# Answers ----------------------------------------------------------------------------------------------------


def test_known_banking77_texts_get_their_gold_labels(clean: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    for ex in w.examples("test")[::7] + w.examples("train")[::29]:
        ans = clean.answer(B77, ex.text)
        data = json.loads(ans.content)
        assert ans.match == "exact" and ans.flaw is None and ans.finish_reason == "stop"
        assert data == {
            "intent": ex.intent,
            "tool": w.tool_for_intent(ex.intent),
            "arguments": banking77_arguments(ex.text),
            "reply": BANKING77_REPLIES[ex.intent],
        }


def test_exact_match_folds_case_and_whitespace(clean: ReferenceTeacher) -> None:
    ans = clean.answer(B77, "  i am STILL waiting on my   card? ")
    assert ans.match == "exact" and json.loads(ans.content)["intent"] == "card_arrival"
    assert normalise(" A  b\tC ") == "a b c"


def test_nlupp_answers_carry_all_intents_and_the_slot_texts(clean: ReferenceTeacher) -> None:
    ans = clean.answer(NLUPP, "ok, I can make it between 9 05 in the morning and 25 to 7 p.m. any day next week")
    assert json.loads(ans.content) == {
        "intent": "acknowledge+make_open_apply_setup_get_activate",
        "tool": "general_support",
        "arguments": {"date_period": "next week", "time_from": "9 05 in the morning", "time_to": "25 to 7 p.m."},
        "reply": "I can help you with that.",
    }
    multi = [ex for ex in clean.workload(NLUPP).examples() if len(ex.intents) >= 3][:50]
    for ex in multi:
        data = json.loads(clean.answer(NLUPP, ex.text).content)
        if clean.answer(NLUPP, ex.text).example is ex:  # not one of the few duplicated texts
            assert set(data["intent"].split("+")) == set(ex.intents)
            assert data["arguments"] == dict(ex.arguments)


def test_unseen_messages_get_the_nearest_examples_label(clean: ReferenceTeacher) -> None:
    cases = {
        "my new card still hasnt arrived, where is it??": "card_delivery_status",
        "someone stole my card last night, please block it": "card_block",
        "how much do you charge to top up with a card": "fees_info",
        "I sent money to a friend but he has not received it": "transfer_status",
        "my transfer to my brother is still pending, when will it go through": "transfer_status",
        "I want my money back for this purchase": "refund_request",
    }
    for text, tool in cases.items():
        ans = clean.answer(B77, text)
        assert ans.match == "nearest" and 0 < ans.similarity < 1
        assert json.loads(ans.content)["tool"] == tool, (text, ans.content)
    # arguments come from the message itself, not from the neighbour
    ans = clean.answer(B77, "I was charged 35 dollars twice for the same thing today")
    assert json.loads(ans.content)["arguments"] == {"amount": "35", "currency": "USD"}
    ans = clean.answer(NLUPP, "I lost my card")
    assert json.loads(ans.content)["arguments"] == {} and json.loads(ans.content)["tool"] == "card_block"


def test_nearest_neighbour_labels_held_out_messages_plausibly(workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    train_only = dataclasses.replace(w, _examples=w.examples("train"), _rank={}, _tool_of={})
    teacher = ReferenceTeacher({"banking77": train_only})
    held_out = w.examples("test")[::5]
    right = sum(json.loads(teacher.answer(B77, ex.text).content)["intent"] == ex.intent for ex in held_out)
    assert right / len(held_out) > 0.75  # intent accuracy of a retrieval stand-in on unseen BANKING77 texts


def test_a_message_sharing_nothing_still_gets_a_deterministic_answer(clean: ReferenceTeacher) -> None:
    a, b = clean.answer(B77, "🙂🙂"), clean.answer(B77, "🙂🙂")
    assert a.match == "hashed" and a.content == b.content
    assert clean.workload(B77).check_output(a.content) == []


def test_tools_give_a_tool_call_with_the_same_answer(clean: ReferenceTeacher) -> None:
    ans = clean.answer(B77, "Why do I see an extra £1 charge on my statement?", tools=True)
    data = json.loads(ans.content)
    assert ans.tool_call == (data["tool"], json.dumps(data["arguments"]))
    assert ans.finish_reason == "tool_calls"
    assert json.loads(ans.tool_call[1]) == {"amount": "1", "currency": "GBP"}


def test_max_tokens_cuts_the_answer_like_a_model(clean: ReferenceTeacher) -> None:
    ans = clean.answer(B77, "I am still waiting on my card?", tools=True, max_tokens=5)
    assert ans.finish_reason == "length" and ans.tool_call is None and len(ans.content) == 20


def test_unknown_model_names_the_model_and_the_known_ones(clean: ReferenceTeacher) -> None:
    with pytest.raises(UnknownModel) as err:
        clean.answer("gpt-4o", "hello")
    assert "gpt-4o" in str(err.value) and B77 in str(err.value) and NLUPP in str(err.value)


# Flaws ------------------------------------------------------------------------------------------------------


def _texts(workloads: dict[str, Workload], n: int) -> list[str]:
    return [ex.text for ex in workloads["banking77"].examples()[:n]]


def test_flaw_rates_are_a_third_of_the_rate_each(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    texts = _texts(workloads, 3000)
    kinds = [flawed.answer(B77, t).flaw for t in texts]
    for kind in FLAW_KINDS:
        assert abs(kinds.count(kind) / len(texts) - 0.1) < 0.02, (kind, kinds.count(kind))
    assert abs(kinds.count(None) / len(texts) - 0.7) < 0.03
    assert all(flaw_for(0, t, 0.0) is None for t in texts[:200])
    assert all(flaw_for(0, t, 1.0) is not None for t in texts[:200])


def test_flaws_are_deterministic_per_seed_and_text(workloads: dict[str, Workload]) -> None:
    texts = _texts(workloads, 500)
    one = ReferenceTeacher(workloads, flaw_rate=0.3, seed=7)
    again = ReferenceTeacher(workloads, flaw_rate=0.3, seed=7)
    other = ReferenceTeacher(workloads, flaw_rate=0.3, seed=8)
    first = [one.answer(B77, t).content for t in texts]
    assert first == [again.answer(B77, t).content for t in texts]
    assert first == [one.answer(B77, t).content for t in texts]  # a repeated message, the same answer
    assert first != [other.answer(B77, t).content for t in texts]


def test_flaws_can_be_switched_off_per_request(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    texts = _texts(workloads, 300)
    assert any(flawed.answer(B77, t).flaw for t in texts)
    assert not any(flawed.answer(B77, t, flaws=False).flaw for t in texts)


def _by_kind(teacher: ReferenceTeacher, texts: list[str], kind: str, model: str = B77) -> list:
    return [a for a in (teacher.answer(model, t, tools=True) for t in texts) if a.flaw == kind]


def test_hedging_keeps_the_json_and_hedges_the_reply(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    hedged = _by_kind(flawed, _texts(workloads, 600), "hedge")
    assert len(hedged) > 20
    for ans in hedged:
        data = json.loads(ans.content)
        assert any(p in data["reply"].lower() for p in HEDGE_PHRASES), data["reply"]
        assert w.check_output(ans.content) == []  # format-valid: only a content check catches it
        assert data["intent"] == ans.example.intent and ans.tool_call[0] == data["tool"]


def test_invalid_tool_names_a_tool_outside_the_list(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    w = workloads["banking77"]
    invalid = _by_kind(flawed, _texts(workloads, 600), "invalid_tool")
    assert len(invalid) > 20
    names = set()
    for ans in invalid:
        data = json.loads(ans.content)
        assert data["tool"] not in w.tools and ans.tool_call[0] == data["tool"]
        assert w.check_output(ans.content) == [f"invalid tool {data['tool']!r}"]
        names.add(data["tool"])
    assert len(names) > 5  # varied, like real hallucinated names


def test_malformed_json_does_not_parse(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    broken = _by_kind(flawed, _texts(workloads, 900), "malformed_json")
    assert len(broken) > 30
    cut_off = 0
    for ans in broken:
        with pytest.raises(ValueError):
            json.loads(ans.content)
        assert ans.content.lstrip().startswith("{")
        if ans.finish_reason == "length":  # the cut-off variant: an object that stops mid-way
            cut_off += 1
            whole = flawed.answer(B77, ans.example.text, flaws=False).content
            assert whole.startswith(ans.content) and len(ans.content) < 0.95 * len(whole)
    assert 0.25 < cut_off / len(broken) < 0.75


def test_nlupp_has_flaws_too(flawed: ReferenceTeacher, workloads: dict[str, Workload]) -> None:
    texts = [ex.text for ex in workloads["nlupp"].examples()]
    kinds = [flawed.answer(NLUPP, t).flaw for t in texts]
    assert 0.2 < sum(k is not None for k in kinds) / len(texts) < 0.4


# Latency and the in-process Teacher interface ---------------------------------------------------------------


def test_latency_is_lognormal_around_the_median(workloads: dict[str, Workload]) -> None:
    teacher = ReferenceTeacher(workloads, latency_ms=400, seed=3)
    draws = [teacher.sample_latency_ms() for _ in range(4000)]
    assert 370 < statistics.median(draws) < 430
    p95 = sorted(draws)[int(0.95 * len(draws))]
    assert 1.6 * 400 < p95 < 2.3 * 400
    assert max(draws) <= 4000
    assert teacher.sample_latency_ms(0) == 0.0
    assert teacher.sample_latency_ms(250, 0) == 250.0
    assert ReferenceTeacher(workloads).sample_latency_ms() == 0.0


async def test_in_process_teacher_implements_the_interface(workloads: dict[str, Workload]) -> None:
    teacher = ReferenceTeacher(workloads, latency_ms=30, latency_sigma=0)
    assert isinstance(teacher, Teacher)
    done = await teacher.complete(
        [ChatMessage(role="system", content="You route."), ChatMessage(role="user", content="I lost my card")],
        model=NLUPP,
        tools='[{"type": "function", "function": {"name": "card_block"}}]',
    )
    assert done.latency_ms >= 29 and done.finish_reason == "tool_calls"
    assert done.tool_calls[0].name == "card_block" and json.loads(done.content)["tool"] == "card_block"
    assert done.input_tokens > 0 and done.output_tokens == (len(done.content) + 3) // 4
    with pytest.raises(TeacherError) as err:
        await teacher.complete([ChatMessage(role="user", content="hi")], model="gpt-4o")
    assert err.value.status == 404 and "gpt-4o" in str(err.value)


# The stack component ----------------------------------------------------------------------------------------


def test_component_from_settings_and_its_checks(tmp_path: Path) -> None:
    from services.core.settings import Settings
    from services.stack.teacher import ReferenceTeacherServer

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    settings = Settings(home=tmp_path, teacher_url=url, reference_teacher_latency_ms=5, data_dir=tmp_path)
    comp = ReferenceTeacherServer.from_settings(settings)
    assert comp.name == "teacher" and comp.endpoints() == {"teacher": url}
    assert comp.ports[0].port == port and comp.ports[0].setting == "FLYWHEEL_TEACHER_URL"
    cmd = comp.command()
    assert cmd[1:3] == ["-m", "services.teacher"]
    assert cmd[cmd.index("--latency-ms") + 1] == "5.0" and cmd[cmd.index("--prefix") + 1] == "/v1"
    with pytest.raises(StackError, match=r"banking77/train\.csv"):
        comp.prepare()
    assert not comp.ready()  # nothing listens there
    ReferenceTeacherServer.from_settings(Settings(home=tmp_path, data_dir=DATA)).prepare()


# Plan-and-execute: plans and step answers (docs/plan-execute.md) ---------------------------------------------
PLAN_TEXT = "block my card cause I can't find it for last 3 hours"  # cancel_close_leave_freeze+card+lost_stolen


def _plan_chat(text: str, system: str | None = "You route banking requests.") -> list[tuple[str, str]]:
    from services.router.plan import plan_messages

    messages = ([ChatMessage(role="system", content=system)] if system else []) + [
        ChatMessage(role="user", content=text)
    ]
    return [(m.role, m.content) for m in plan_messages(messages, max_steps=6)]


def test_a_plan_has_one_step_per_intent_most_specific_first(clean: ReferenceTeacher) -> None:
    from services.router.plan import parse_plan
    from services.teacher.contract import STEP_INSTRUCTION

    ans = clean.answer_chat(NLUPP, _plan_chat(PLAN_TEXT), tools=True)
    assert (ans.kind, ans.finish_reason, ans.tool_call, ans.flaw) == ("plan", "stop", None, None)
    steps = json.loads(ans.content)["steps"]
    assert steps == [
        {"instruction": STEP_INSTRUCTION.format(intent=i, text=PLAN_TEXT), "intent": i, "tool": tool}
        for i, tool in (
            ("lost_stolen", "card_block"),  # NLUPP_TOOLS rank: the card block first
            ("card", "card_services"),
            ("cancel_close_leave_freeze", "general_support"),
        )
    ]
    # It is a plan the router accepts for the shipped NLU++ agents' contract.
    agent = load_agents_file().agent("banking-planner")
    plan = parse_plan(
        ans.content, max_steps=6, valid_tools=agent.output.valid_tools, valid_intents=agent.output.intents
    )
    assert len(plan.steps) == 3
    # Every NLU++ message: as many steps as intents. BANKING77: one step.
    for ex in clean.workload(NLUPP).examples()[::40]:
        got = json.loads(clean.answer_chat(NLUPP, _plan_chat(ex.text, None)).content)["steps"]
        if clean.answer(NLUPP, ex.text).example is ex:  # not one of the few duplicated texts
            assert sorted(s["intent"] for s in got) == sorted(ex.intents)
    [one] = json.loads(clean.answer_chat(B77, _plan_chat("I am still waiting on my card?")).content)["steps"]
    assert (one["intent"], one["tool"]) == ("card_arrival", "card_delivery_status")


def load_agents_file():
    from services.core.agents import load_agents

    return load_agents(REPO_ROOT / "agents.yaml")


def test_a_step_is_answered_for_its_intent_alone(clean: ReferenceTeacher) -> None:
    steps = json.loads(clean.answer_chat(NLUPP, _plan_chat(PLAN_TEXT)).content)["steps"]
    answers = []
    for step in steps:
        chat = [("system", "You route banking requests."), ("user", step["instruction"])]
        ans = clean.answer_chat(NLUPP, chat)
        assert ans.kind == "step" and ans.match == "exact" and ans.finish_reason == "stop"
        answers.append(json.loads(ans.content))
    assert answers[0] == {
        "intent": "lost_stolen",
        "tool": "card_block",
        "arguments": {"time_period": "last 3 hours"},  # read from the quoted message
        "reply": NLUPP_REPLIES["card_block"],
    }
    assert [a["intent"] for a in answers] == ["lost_stolen", "card", "cancel_close_leave_freeze"]
    assert all(clean.workload(NLUPP).check_output(json.dumps(a)) == [] for a in answers)
    # With tools, a step carries its tool call like any answer.
    with_tools = clean.answer(NLUPP, steps[0]["instruction"], tools=True)
    assert with_tools.tool_call == ("card_block", '{"time_period": "last 3 hours"}')
    # An instruction naming no intent of the workload is just a message (nearest example).
    other = clean.answer(NLUPP, f"Handle only the 'weather' part of: {PLAN_TEXT}")
    assert other.kind == "answer"
    # A quoted message outside the data set: the arguments are read from it.
    unseen = clean.answer(NLUPP, "Handle only the 'card' part of: my card went missing yesterday, block it")
    assert unseen.kind == "step" and json.loads(unseen.content)["intent"] == "card"


def test_plans_only_without_the_marker_nothing_changes(clean: ReferenceTeacher) -> None:
    chat = [("system", "You route banking requests."), ("user", PLAN_TEXT)]
    assert clean.answer_chat(NLUPP, chat) == clean.answer(NLUPP, PLAN_TEXT)
    assert clean.answer_chat(NLUPP, [("user", "[flywheel:plan] " + PLAN_TEXT)]).kind == "answer"  # users cannot


def test_plans_have_flaws_too_deterministically(workloads: dict[str, Workload]) -> None:
    from services.router.plan import PlanError, parse_plan

    teacher = ReferenceTeacher(workloads, flaw_rate=1.0, seed=3)
    tools = set(NLUPP_TOOLS)
    kinds: dict[str | None, int] = {}
    for ex in workloads["nlupp"].examples()[:120]:
        ans = teacher.answer_chat(NLUPP, _plan_chat(ex.text))
        assert ans == teacher.answer_chat(NLUPP, _plan_chat(ex.text))  # reproducible
        kinds[ans.flaw] = kinds.get(ans.flaw, 0) + 1
        if ans.flaw is None:  # the hedge draw: a plan has nothing to hedge
            parse_plan(ans.content, max_steps=6, valid_tools=tools)
        else:
            with pytest.raises(PlanError):
                parse_plan(ans.content, max_steps=6, valid_tools=tools)
            assert (ans.finish_reason == "length") <= (ans.flaw == "malformed_json")
    assert set(kinds) == {None, "invalid_tool", "malformed_json"}
    # Switched off per request, as for answers.
    assert teacher.answer_chat(NLUPP, _plan_chat(PLAN_TEXT), flaws=False).flaw is None


def test_max_tokens_cuts_a_plan(clean: ReferenceTeacher) -> None:
    ans = clean.answer_chat(NLUPP, _plan_chat(PLAN_TEXT), max_tokens=10)
    assert ans.finish_reason == "length" and len(ans.content) == 40


async def test_in_process_teacher_plans(clean: ReferenceTeacher) -> None:
    from services.router.plan import plan_messages

    done = await clean.complete(plan_messages([ChatMessage(role="user", content=PLAN_TEXT)], 6), model=NLUPP)
    assert done.finish_reason == "stop" and done.tool_calls == []
    assert [s["intent"] for s in json.loads(done.content)["steps"]] == [
        "lost_stolen",
        "card",
        "cancel_close_leave_freeze",
    ]
