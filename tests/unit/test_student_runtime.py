"""The student runtime's pure parts: PROMPT validation, the truncation rule, the label cursor against the plain
decode's constraint, label tails."""

from __future__ import annotations

import json

import pytest

from services.student_runtime.labels import LabelTrie
from services.student_runtime.prompt import PromptError, fit_prompt, parse_prompt, shared_prefix_ids
from services.student_runtime.reference import LabelConstraint
from services.trainer import data as D
from tests.helpers.tiny_model import build_tiny_tokenizer

LABELS = ["card_arrival", "card_linking", "lost_or_stolen_card", "balance", "refund"]


def test_prompts_are_parsed_or_refused_with_the_reason() -> None:
    messages, tools = parse_prompt(json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [1]}))
    assert messages == [{"role": "user", "content": "hi"}] and tools == [1]
    assert parse_prompt("plain text") == (None, None)
    assert parse_prompt(json.dumps([{"role": "assistant", "content": None}]))[0] == [
        {"role": "assistant", "content": ""}
    ]
    with pytest.raises(PromptError, match="empty"):
        parse_prompt("  ")
    with pytest.raises(PromptError, match="over the limit"):
        parse_prompt("x" * 70000)
    with pytest.raises(PromptError, match="unknown chat role 'robot'"):
        parse_prompt(json.dumps([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]))
    with pytest.raises(PromptError, match="content of type int"):
        parse_prompt(json.dumps([{"role": "user", "content": 5}]))
    with pytest.raises(PromptError, match="empty message list"):
        parse_prompt(json.dumps({"messages": []}))


def test_long_prompts_keep_the_shared_prefix_and_their_end() -> None:
    ids = list(range(100))
    assert fit_prompt(ids, 200, [0, 1, 2]) == ids
    assert fit_prompt(ids, 10, [0, 1, 2]) == [0, 1, 2, *range(93, 100)]
    assert fit_prompt(ids, 10, [5, 6]) == list(range(90, 100))  # not its prefix: only the end
    assert fit_prompt(ids, None) == ids


def test_shared_prefix_is_the_system_turn() -> None:
    tok = build_tiny_tokenizer()
    prefix = shared_prefix_ids(tok, "Be brief.")
    assert tok.decode(prefix).startswith("<|system|>Be brief.<|end|>")
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my card?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tok.encode(rendered, add_special_tokens=False)[: len(prefix)] == prefix


def test_the_label_cursor_decides_as_the_plain_decode_does() -> None:
    tok = build_tiny_tokenizer()
    trie = LabelTrie(tok, LABELS, '{"intent": "', '"', tok.eos_token_id)
    reference = LabelConstraint(trie)
    # Encoded as training encodes it (label and suffix apart): the tokens constrained decoding produces.
    answer = D.answer_token_ids(tok, '{"intent": "card_linking", "arguments": {}}', tok.eos_token_id)
    cursor, state = trie.cursor("prompt"), reference.new_state("prompt")
    for i, token in enumerate(answer):
        assert cursor.allowed() == reference.allowed(state, answer[:i])
        cursor.advance(token)
    assert cursor.allowed() == reference.allowed(state, answer)
    assert (cursor.start, cursor.end) == (state["start"], state["end"])
    assert tok.decode(cursor.label_tokens) == 'card_linking"'


def test_label_tails_are_the_usual_text_after_each_label() -> None:
    targets = [
        '{"intent": "a", "arguments": {}}',
        '{"intent": "a", "arguments": {}}',
        '{"intent": "a", "arguments": {"x": "1"}}',
        '{"intent": "b", "arguments": {"x": "2"}}',
        "junk",
    ]
    tails, default = D.label_tails(targets)
    assert tails == {"a": ', "arguments": {}}', "b": ', "arguments": {"x": "2"}}'}
    assert default == ', "arguments": {}}'
    # The tail corpus: every distinct tail, most common first (drafts for answers with arguments).
    assert D.tail_corpus(targets) == [', "arguments": {}}', ', "arguments": {"x": "1"}}', ', "arguments": {"x": "2"}}']
    assert D.tail_corpus(targets, limit=1) == [', "arguments": {}}']
    assert D.prompt_limit(256, [12, 30]) == 226 and D.prompt_limit(256, [200]) == 128
