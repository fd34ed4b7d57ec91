"""Agreement, format compliance, snapshot reading and tokenisation with the loss on the answer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.agents import Output
from services.trainer import data as D
from services.trainer.evaluate import agrees, format_problems, judge, percentile
from tests.helpers.tiny_model import build_tiny_tokenizer

TEACHER = json.dumps({"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {}, "reply": "Ok."})
OUTPUT = Output(valid_tools=["card_delivery_status", "card_block"], intents=["card_arrival", "lost_or_stolen_card"])


def answer(**kw: object) -> str:
    data = {"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {}, "reply": "Sure."}
    data.update(kw)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("student", "expected"),
    [
        (answer(), True),  # the reply is free text: not compared
        (answer(intent="lost_or_stolen_card"), False),
        (answer(tool="card_block"), False),
        (answer(arguments={"amount": "5"}), False),
        ('{"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {}', False),  # cut off
        ("I can help with that!", False),
        ("", False),
        ("[1, 2]", False),
        (answer(arguments="none"), False),
    ],
)
def test_agreement(student: str, expected: bool) -> None:
    assert agrees(student, TEACHER) is expected


def test_agreement_normalises_argument_values_and_rejects_malformed_teacher() -> None:
    teacher = answer(arguments={"amount": "20", "currency": "EUR"})
    assert agrees(answer(arguments={"currency": "eur ", "amount": "20"}), teacher)
    assert not agrees(answer(), "{not json")
    assert not agrees(None, TEACHER)


def test_format_problems() -> None:
    assert format_problems(answer(), OUTPUT) == []
    assert format_problems(answer(intent="made_up"), OUTPUT) == ["unknown intent 'made_up'"]
    assert format_problems(answer(tool="escalate_ticket"), OUTPUT) == ["invalid tool 'escalate_ticket'"]
    assert "arguments must be an object of strings" in format_problems(answer(arguments={"n": 5}), OUTPUT)
    assert format_problems("nope", OUTPUT) == ["not a JSON object"]
    extra = json.loads(answer())
    extra["why"] = "x"
    assert format_problems(json.dumps(extra), OUTPUT)[0].startswith("keys")
    # Multi-label intents (NLU++): each '+'-joined part must be known.
    multi = Output(intents=["card", "lost_stolen"])
    assert format_problems(answer(intent="card+lost_stolen"), multi) == []
    assert format_problems(answer(intent="card+nope"), multi) == ["unknown intent 'card+nope'"]


def test_judge_and_percentile() -> None:
    j = judge("r1", answer(), 0.7, TEACHER, "card_arrival", OUTPUT)
    assert j.agreed and j.compliant and j.correct is True
    assert judge("r2", "x", 0.1, TEACHER, None, OUTPUT).correct is None
    assert percentile([5, 1, 3, 2, 4], 95) == 5
    assert percentile([], 95) == 0.0


def test_target_segments_split_at_the_constrained_label() -> None:
    assert D.target_segments(TEACHER) == [
        '{"intent": "',
        'card_arrival"',
        ', "tool": "card_delivery_status", "arguments": {}, "reply": "Ok."}',
    ]
    assert D.target_segments("plain text") == ["plain text"]
    assert "".join(D.target_segments(TEACHER)) == TEACHER


def test_encoding_masks_the_prompt_and_learns_answer_plus_eos() -> None:
    tok = build_tiny_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Where is my card?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = D.encode_example(tok, prompt, TEACHER, tok.eos_token_id, max_len=512)
    assert enc is not None
    prompt_len = len(tok.encode(prompt, add_special_tokens=False))
    assert enc.labels[:prompt_len] == [D.IGNORE] * prompt_len
    answer_ids = enc.labels[prompt_len:]
    assert D.IGNORE not in answer_ids
    assert answer_ids == enc.input_ids[prompt_len:]
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(answer_ids[:-1]) == TEACHER
    assert enc.answer_tokens == len(answer_ids)


def test_encoding_cuts_long_prompts_from_the_left_and_skips_oversized_answers() -> None:
    tok = build_tiny_tokenizer()
    prompt = "word " * 400
    enc = D.encode_example(tok, prompt, TEACHER, tok.eos_token_id, max_len=64)
    assert enc is not None and len(enc.input_ids) == 64 and enc.labels[-1] == tok.eos_token_id
    assert D.encode_example(tok, prompt, TEACHER * 10, tok.eos_token_id, max_len=64) is None


def test_encoding_marks_where_the_label_head_reads_and_which_label_it_learns() -> None:
    tok = build_tiny_tokenizer()
    target = json.dumps({"intent": "card_arrival", "arguments": {}})
    enc = D.encode_example(tok, "prompt", target, tok.eos_token_id, 64, label_index={"balance": 0, "card_arrival": 1})
    assert enc is not None and enc.head_label == 1
    # The head reads the prefix's last token: the position whose output would otherwise pick the label's first token.
    prefix = tok.encode(D.LABEL_PREFIX, add_special_tokens=False)
    assert enc.input_ids[enc.head_pos - len(prefix) + 1 : enc.head_pos + 1] == prefix
    assert enc.labels[enc.head_pos] == D.IGNORE or enc.labels[enc.head_pos] == prefix[-1]
    assert enc.labels[enc.head_pos + 1] == enc.input_ids[enc.head_pos + 1]  # the label's first token is learnt
    # An unknown label, or no label index: no head example (the batch then carries no head tensors).
    unknown = D.encode_example(tok, "prompt", target, tok.eos_token_id, 64, label_index={"balance": 0})
    plain = D.encode_example(tok, "prompt", target, tok.eos_token_id, 64)
    assert unknown is not None and plain is not None and unknown.head_label == plain.head_label == -1
    assert "head_label" not in D.collate([plain], 0)
    tensors = D.collate([enc, plain], 0)
    assert tensors["head_label"].tolist() == [1, -1] and tensors["head_pos"][0] == enc.head_pos


def test_batches_are_deterministic_and_collate_pads_labels() -> None:
    items = [D.Encoded(list(range(n)), [D.IGNORE] * (n - 1) + [7]) for n in range(1, 30)]
    one = D.batches(items, 4, seed=3)
    assert one == D.batches(items, 4, seed=3)
    assert sorted(len(e.input_ids) for b in one for e in b) == list(range(1, 30))
    tensors = D.collate(one[0], pad_id=0)
    width = max(len(e.input_ids) for e in one[0])
    assert tensors["input_ids"].shape == (len(one[0]), width)
    for row, e in enumerate(one[0]):
        assert int(tensors["attention_mask"][row].sum()) == len(e.input_ids)
        assert (tensors["labels"][row, len(e.input_ids) :] == D.IGNORE).all()


def test_snapshot_round_trip_and_student_messages(tmp_path: Path) -> None:
    ex = D.Example("r1", "card_arrival", [{"role": "user", "content": "Where is it?"}], TEACHER, "card_arrival")
    shot = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TEACHER}]
    prompt = D.StagePrompt("Answer in JSON.", [shot])
    folder = D.write_snapshot(tmp_path / "s1", {"snapshot_id": "s1", "agent_id": "a"}, prompt, [ex], [ex])
    snap = D.read_snapshot(f"file://{folder}")
    assert snap.snapshot_id == "s1" and snap.agent_id == "a"
    assert snap.train == [ex] and snap.holdout == [ex] and snap.prompt == prompt
    msgs = D.student_messages(snap.prompt, ex.messages)
    assert msgs[0] == {"role": "system", "content": "Answer in JSON."} and msgs[-1] == ex.messages[0]
    assert len(msgs) == 4
    assert D.training_messages(ex.messages, "S")[0] == {"role": "system", "content": "S"}
    with pytest.raises(FileNotFoundError):
        D.read_snapshot(tmp_path / "missing")


# Answer templates (compact targets) ---------------------------------------------------------------------------
def _answer(intent: str, tool: str, reply: str, **arguments: str) -> str:
    return json.dumps({"intent": intent, "tool": tool, "arguments": arguments, "reply": reply})


TEMPLATE_TARGETS = [
    _answer("card_arrival", "card_delivery_status", "Let me check where your card is."),
    _answer("card_arrival", "card_delivery_status", "Let me check where your card is."),
    _answer("exchange_rate", "exchange_rates", "Here are today's rates."),
    _answer("exchange_rate", "exchange_rates", "Here are today's rates.", amount="£5"),
    _answer("age_limit", "account_management", "Only once."),  # one example: no template
    "not json at all",
]


def test_answer_template_fixes_the_fields_every_label_fixes() -> None:
    template = D.build_answer_template(TEMPLATE_TARGETS)
    assert template["fields"] == ["intent", "tool", "arguments", "reply"]
    # arguments vary for exchange_rate, so the student writes them for every label (one answer shape)
    assert template["by_label"] == {
        "age_limit": {"tool": "account_management", "reply": "Only once."},
        "card_arrival": {"tool": "card_delivery_status", "reply": "Let me check where your card is."},
        "exchange_rate": {"tool": "exchange_rates", "reply": "Here are today's rates."},
    }
    assert D.build_answer_template(["x"]) == {}
    # a stray reply (a hedge curation missed) under the share does not unfix the reply
    many = [_answer("a", "t", "r")] * 19 + [_answer("a", "t", "I'm not sure, but r")]
    assert D.build_answer_template(many)["by_label"]["a"] == {"tool": "t", "arguments": {}, "reply": "r"}
    assert D.build_answer_template(many, min_share=1.0)["by_label"]["a"] == {"tool": "t", "arguments": {}}


def test_compact_target_round_trips_through_the_serving_expansion() -> None:
    from services.student_runtime import expand_answer

    expand = expand_answer
    template = D.build_answer_template(TEMPLATE_TARGETS)
    for target in TEMPLATE_TARGETS:
        compact = D.compact_target(target, template)
        if not target.startswith("{"):
            assert compact == target and expand(compact, template) == target
            continue
        # the same object with the keys in the teacher's order
        assert list(json.loads(expand(compact, template)).items()) == list(json.loads(target).items())
        assert compact.startswith(D.LABEL_PREFIX) and "tool" not in compact and "reply" not in compact
        assert '"arguments"' in compact
    expected = '{"intent": "exchange_rate", "arguments": {"amount": "£5"}}'
    assert D.compact_target(TEMPLATE_TARGETS[3], template) == expected
    # an answer the student got wrong is left for the format check to judge
    assert expand('{"intent": "unknown"}', template) == '{"intent": "unknown"}'
    assert expand("{broken", template) == "{broken"


def test_template_prompt_names_the_fields_the_student_writes() -> None:
    template = D.build_answer_template(TEMPLATE_TARGETS)
    assert D.template_prompt(template).endswith("Answer with JSON: intent, arguments.")
    assert D.template_prompt({}) == D.COMPACT_SYSTEM_PROMPT
