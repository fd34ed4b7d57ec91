"""The curator's pure logic: grace criteria, labels, filters, split, prompt, snapshot files, decisions."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from services.core.agents import AgentConfig, GracePeriod
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered
from services.curator import filters, labelling
from services.curator.filters import Pair, canonical_answer, curate
from services.curator.grace import GraceCounts, grace_status, retry_due
from services.curator.prompt import build_prompt, pick_few_shot, student_messages
from services.curator.service import decide
from services.curator.snapshot import dataset_record, read_snapshot, write_snapshot
from services.curator.split import holdout_size, split

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
SCHEMA = {
    "type": "object",
    "required": ["intent", "tool", "arguments", "reply"],
    "additionalProperties": False,
    "properties": {
        "intent": {"type": "string", "enum": ["card_arrival", "exchange_rate", "lost_card"]},
        "tool": {"type": "string", "enum": ["card_delivery_status", "exchange_rates", "card_block"]},
        "arguments": {"type": "object", "additionalProperties": {"type": "string"}},
        "reply": {"type": "string", "minLength": 1, "maxLength": 200},
    },
}
AGENT = AgentConfig(
    agent_id="bot",
    output={"valid_tools": ["card_delivery_status", "exchange_rates", "card_block"], "json_schema": SCHEMA},
)
TOOL = {"card_arrival": "card_delivery_status", "exchange_rate": "exchange_rates", "lost_card": "card_block"}


def answer(intent: str = "card_arrival", reply: str = "Let me check.", **kw) -> str:
    obj = {"intent": intent, "tool": TOOL.get(intent, "nope"), "arguments": {}, "reply": reply, **kw}
    return json.dumps(obj)


def pair(rid: str, text: str = "where is my card", content: str | None = None, **kw) -> Pair:
    content = answer() if content is None else content
    intent = kw.pop("intent", None)
    if intent is None:
        intent = labelling.teacher_intent(content)
    return Pair(rid, ({"role": "user", "content": text},), text, content, intent=intent, **kw)


# Grace -----------------------------------------------------------------------------------------------------
def test_grace_collecting_and_describe() -> None:
    counts = GraceCounts("support-bot", 212, 41, NOW - timedelta(days=2, hours=3))
    status = grace_status(counts, GracePeriod(), NOW)
    assert not status.complete and status.reason == "collecting"
    assert status.describe() == "support-bot: grace 212/300 conversations, 41/50 intents, day 3/14"
    assert status.unmet == ("conversations", "intents")


def test_grace_minimums_met() -> None:
    status = grace_status(GraceCounts("a", 300, 50, NOW - timedelta(hours=1)), GracePeriod(), NOW)
    assert status.complete and status.reason == "minimums_met"
    assert status.describe().endswith("day 1/14 (complete)")
    assert status.evidence()["conversations"] == 300


@pytest.mark.parametrize(("on_timeout", "complete"), [("proceed", True), ("wait", False)])
def test_grace_timeout_names_the_unmet_minimum(on_timeout: str, complete: bool) -> None:
    cfg = GracePeriod(min_conversations=10, min_unique_intents=5, max_duration_days=14, on_timeout=on_timeout)
    status = grace_status(GraceCounts("a", 40, 3, NOW - timedelta(days=15)), cfg, NOW)
    assert status.complete is complete
    assert status.unmet == ("intents",)
    assert status.reason == f"timeout_{on_timeout}"
    text = status.describe()
    assert "intents 3/5" in text and "conversations 40" not in text.split(";")[1]
    assert ("proceeding" in text) is complete


def test_grace_no_traffic() -> None:
    status = grace_status(GraceCounts("a"), GracePeriod(), NOW)
    assert not status.complete and status.reason == "no_traffic" and status.day == 0


def test_retry_waits_for_growth() -> None:
    assert not retry_due(120, 100, 0.25)
    assert retry_due(125, 100, 0.25)
    assert retry_due(1, 0, 0.25)


# Labels ----------------------------------------------------------------------------------------------------
def test_label_precedence() -> None:
    assert labelling.label_for("billing", answer("card_arrival")) == ("billing", "client")
    assert labelling.label_for(None, answer("card_arrival")) == ("card_arrival", "teacher")
    assert labelling.label_for("", json.dumps({"tool": "card_block"})) == ("card_block", "teacher")
    calls = json.dumps([{"id": "1", "name": "lookup", "arguments": "{}"}])
    assert labelling.label_for(None, None, calls) == ("lookup", "teacher")
    assert labelling.label_for(None, "not json") is None
    assert labelling.label_for(None, None) is None


def test_clustering_is_deterministic_and_joins_known_centroids() -> None:
    e = np.eye(4, dtype=np.float32)
    names, cents = labelling.centroids(["a", "a", "b"], np.stack([e[0], e[0], e[1]]))
    assert names == ["a", "b"]
    vecs = np.stack([e[0], e[2], e[2] * 0.9 + e[3] * 0.1, e[3]])
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    got = labelling.assign_clusters(vecs, names, cents, threshold=0.7, first_index=3)
    assert got == ["a", "cluster_03", "cluster_03", "cluster_04"]
    assert got == labelling.assign_clusters(vecs, names, cents, threshold=0.7, first_index=3)
    assert labelling.next_cluster_index(["cluster_03", "x", "cluster_10"]) == 11


# Filters ---------------------------------------------------------------------------------------------------
def test_each_filter() -> None:
    assert filters.empty_input(pair("1", text="  "), AGENT)
    assert not filters.empty_input(pair("1"), AGENT)
    assert filters.teacher_error(pair("1", teacher_error="timeout"), AGENT)
    assert filters.teacher_error(Pair("1", (), "x", None), AGENT)
    assert filters.not_final(pair("1", finish_reason="length"), AGENT)
    assert not filters.not_final(pair("1", finish_reason="stop"), AGENT)
    assert not filters.not_final(pair("1"), AGENT)  # unknown finish reason: not judged
    assert filters.unparseable(pair("1", content='{"intent": '), AGENT)
    teleport = {"intent": "card_arrival", "tool": "teleport", "arguments": {}, "reply": "ok"}
    assert filters.invalid_tool(pair("1", content=json.dumps(teleport)), AGENT)
    assert not filters.invalid_tool(pair("1"), AGENT)
    assert filters.schema_mismatch(pair("1", content=answer("unknown_intent")), AGENT)
    assert filters.schema_mismatch(pair("1", content=json.dumps({"intent": "card_arrival"})), AGENT)
    assert not filters.schema_mismatch(pair("1"), AGENT)
    assert filters.hedging(pair("1", content=answer(reply="I\u2019M NOT SURE, maybe.")), AGENT)
    assert not filters.hedging(pair("1"), AGENT)


def test_minimal_schema_validator_agrees() -> None:
    good = json.loads(answer())
    assert filters._minimal_validate(good, SCHEMA, "$") == []
    assert filters._minimal_validate({**good, "extra": 1}, SCHEMA, "$")
    assert filters._minimal_validate({**good, "reply": ""}, SCHEMA, "$")
    assert filters._minimal_validate({**good, "arguments": {"a": 1}}, SCHEMA, "$")


def test_curate_counts_each_filter_and_keeps_first_duplicate() -> None:
    pairs = [
        pair("07", text="Where is my card?"),
        pair("03", text="where is my card"),  # exact duplicate of 07 after normalisation; 03 comes first
        pair("05", text="where is my card!!"),
        pair("01", text="", content=answer()),
        pair("02", content="oops"),
        pair("04", content=answer(reply="I cannot say")),
        pair("06", text="my card has not arrived yet, where is it", teacher_error="boom"),
        pair("08", text="what is the exchange rate for euros", content=answer("exchange_rate")),
        pair("09", text="what is the exchange rate for euro", content=answer("exchange_rate")),
    ]
    result = curate(pairs, AGENT)
    assert [p.request_id for p in result.kept] == ["03", "08"]
    s = result.stats
    assert s["candidates"] == 9 and s["kept"] == 2
    assert (s["empty_input"], s["unparseable"], s["hedging"], s["teacher_error"]) == (1, 1, 1, 1)
    assert s["exact_duplicate"] == 2 and s["near_duplicate"] == 1
    assert sum(v for k, v in s.items() if k not in ("candidates", "kept")) == 7


def test_near_duplicates_by_embedding_and_cap() -> None:
    ps = [pair("a"), pair("b", text="other"), pair("c", text="third")]
    vecs = np.array([[1, 0], [0.99, 0.141], [0, 1]], dtype=np.float32)
    assert filters.near_duplicates(ps, 0.95, vecs) == [False, True, False]
    assert filters.over_intent_cap(ps, 2) == [False, False, True]


def test_canonical_target() -> None:
    obj = {"reply": "Hi é", "arguments": {"amount": "5"}, "tool": "t", "intent": "i", "x": 1}
    assert canonical_answer(obj) == '{"intent":"i","tool":"t","arguments":{"amount":"5"},"reply":"Hi é","x":1}'


# Split -----------------------------------------------------------------------------------------------------
def _records(n_per_intent: dict[str, int]) -> list[dict]:
    out = []
    for intent, n in n_per_intent.items():
        for i in range(n):
            p = pair(f"{intent}-{i:03d}", text=f"{intent} message {i}", content=answer(intent), intent=intent)
            out.append(dataset_record(p))
    return out


def test_split_is_stratified_and_deterministic() -> None:
    records = _records({"card_arrival": 100, "exchange_rate": 40, "lost_card": 1})
    train, holdout = split(records, 0.15, lambda r: r["request_id"], lambda r: r["intent"])
    by = {i: sum(r["intent"] == i for r in holdout) for i in ("card_arrival", "exchange_rate", "lost_card")}
    assert by == {"card_arrival": 15, "exchange_rate": 6, "lost_card": 0}
    assert len(train) + len(holdout) == len(records)
    again = split(list(reversed(records)), 0.15, lambda r: r["request_id"], lambda r: r["intent"])
    assert (train, holdout) == again
    assert holdout_size(2, 0.15) == 0 and holdout_size(4, 0.15) == 1 and holdout_size(1, 0.5) == 0


def test_the_same_traffic_replayed_gives_the_same_holdout_and_no_message_on_both_sides() -> None:
    from services.curator.filters import normalise_text

    first = _records({"card_arrival": 40, "exchange_rate": 20})
    # A replay: the same messages under new request ids, in another order, written slightly differently.
    replay = [
        {
            **r,
            "request_id": f"replay-{i}",
            "messages": [{"role": "user", "content": "  " + r["messages"][-1]["content"].upper() + "!"}],
        }
        for i, r in enumerate(reversed(first))
    ]

    def user_key(r: dict) -> str:
        return normalise_text(r["messages"][-1]["content"])

    _, held = split(first, 0.2, user_key, lambda r: r["intent"])
    _, held_again = split(replay, 0.2, user_key, lambda r: r["intent"])
    assert held and sorted(map(user_key, held)) == sorted(map(user_key, held_again))
    # The same message under two intents: wherever the hash puts it, never on both sides.
    twins = [{**r, "intent": "exchange_rate", "request_id": r["request_id"] + "-twin"} for r in first[:40]]
    train, holdout = split(first + twins, 0.5, user_key, lambda r: r["intent"], tie=lambda r: r["request_id"])
    assert not {user_key(r) for r in train} & {user_key(r) for r in holdout}
    assert len(train) + len(holdout) == 60 + 40


def test_snapshot_files_are_byte_identical_and_content_addressed(tmp_path) -> None:
    records = _records({"card_arrival": 20, "exchange_rate": 10})
    train, holdout = split(records, 0.15, lambda r: r["request_id"], lambda r: r["intent"])
    prompt = build_prompt(AGENT, train)
    kw = dict(
        version=1,
        parent_snapshot_id=None,
        trigger_reason="grace_complete",
        source_query="SELECT 1",
        time_from=None,
        time_to=NOW,
        filter_stats={"kept": 30},
    )
    a = write_snapshot(tmp_path / "a", "bot", train, holdout, prompt, **kw)
    b = write_snapshot(tmp_path / "b", "bot", train, holdout, prompt, **kw)
    assert a.record.snapshot_id == b.record.snapshot_id and a.record.snapshot_id.startswith("ds-")
    for name in ("train.jsonl", "holdout.jsonl", "prompt.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    again = write_snapshot(tmp_path / "a", "bot", train, holdout, prompt, **kw)
    assert again.reused and again.record.snapshot_id == a.record.snapshot_id
    t, h, p, manifest = read_snapshot(a.path)
    assert t == train and h == holdout and p == prompt
    assert manifest["split_counts"] == {"train": len(train), "holdout": len(holdout)}
    assert manifest["filter_stats"] == {"kept": 30} and manifest["code_version"]
    line = (a.path / "train.jsonl").read_text().splitlines()[0]
    assert list(json.loads(line)) == ["gold", "intent", "messages", "request_id", "target"]
    other = write_snapshot(tmp_path / "a", "bot", train[1:], holdout, prompt, **kw)
    assert other.record.snapshot_id != a.record.snapshot_id


# Prompt ----------------------------------------------------------------------------------------------------
def test_prompt_lists_tools_intents_conventions_and_covers_frequent_intents() -> None:
    records = _records({"card_arrival": 5, "exchange_rate": 3, "lost_card": 1})
    records[0]["target"] = canonical_answer(
        {"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {"card": "x"}, "reply": "ok"}
    )
    prompt = build_prompt(AGENT, records, few_shot=2)
    sp = prompt.system_prompt
    assert "Intents: card_arrival, exchange_rate, lost_card" in sp
    assert "Tools: card_delivery_status, exchange_rates, card_block" in sp
    assert "card_delivery_status: card" in sp
    assert '"intent":<intent>,"tool":<tool>' in sp
    assert [json.loads(ex[1]["content"])["intent"] for ex in prompt.few_shot] == ["card_arrival", "exchange_rate"]
    assert pick_few_shot(records, 0) == []
    msgs = student_messages(prompt, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert msgs[0]["role"] == "system" and msgs[0]["content"].endswith("Be brief.")
    assert len(msgs) == 1 + 4 + 1 and msgs[-1] == {"role": "user", "content": "hi"}
    assert len(student_messages(prompt, [{"role": "user", "content": "hi"}], few_shot=False)) == 2


# Decisions -------------------------------------------------------------------------------------------------
def test_decide_follows_the_lifecycle() -> None:
    t = NOW
    trig = RetrainTriggered(agent_id="a", reason="grace_complete", created_at=t)
    snap = DatasetSnapshot(
        snapshot_id="ds-1", agent_id="a", version=1, content_hash="h", uri="u", created_at=t + timedelta(seconds=1)
    )
    rejected = ModelEvent(agent_id="a", kind="rejected", model_name="m", created_at=t + timedelta(seconds=2))
    promoted = ModelEvent(agent_id="a", kind="promoted", model_name="m", model_version=1, created_at=t)
    assert decide("a", []).kind == "grace"
    assert decide("a", [trig]).kind == "build"
    assert decide("a", [trig, snap]).kind == "idle"
    got = decide("a", [trig, snap, rejected])
    assert got.kind == "retry" and got.rejected_at == rejected.created_at
    assert decide("a", [promoted]).kind == "idle"
    assert decide("b", [trig]).kind == "grace"
    # A training job that failed is retried like a rejection, after more data.
    failed = ModelEvent(
        agent_id="a", kind="failed", model_name="m", error="OSError: disk full", created_at=t + timedelta(seconds=2)
    )
    assert decide("a", [trig, snap, failed]).kind == "retry"


# The teacher's finish_reason (interactions.teacher_finish_reason, migration 0004) -----------------------------
def test_not_final_drops_answers_the_teacher_did_not_finish() -> None:
    # Final, or unknown (rows written before 0004, servers that send none): kept.
    for reason in ("stop", "tool_calls", "STOP", None, ""):
        assert filters.not_final(pair("1", finish_reason=reason), AGENT) is None, reason
    # Set and not final: dropped, naming the reason.
    for reason in ("length", "content_filter", "max_tokens"):
        assert filters.not_final(pair("1", finish_reason=reason), AGENT) == f"finish_reason {reason}"
    # In curate: a well-formed answer cut by the token limit is counted under not_final, not kept.
    result = curate(
        [pair("a", "where is my card"), pair("b", "my card was stolen", answer("lost_card"), finish_reason="length")],
        AGENT,
    )
    assert [p.request_id for p in result.kept] == ["a"]
    assert result.stats["not_final"] == 1 and result.examples["not_final"] == ["b"]
