"""Parsing an agent's history for `flywheel import` (pure: no broker)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from services.core.agents import DEFAULT_TIERS
from services.history_import import parse_lines

TIER = DEFAULT_TIERS["cost-optimized"]
NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)
CHAT = {
    "messages": [
        {"role": "system", "content": "You route banking requests."},
        {"role": "user", "content": "My card has not arrived"},
        {"role": "assistant", "content": '{"intent": "card_arrival", "tool": "card_delivery_status"}'},
    ]
}
PAIR = {
    "request": {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Freeze my card please"}]}],
        "tools": [{"type": "function", "function": {"name": "freeze_card"}}],
    },
    "response": {
        "model": "gpt-4o-2024-08-06",
        "created": 1765000000,
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "freeze_card", "arguments": {}}}
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 31, "completion_tokens": 9},
    },
}


def lines(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def test_both_formats_become_teacher_interactions() -> None:
    parsed = parse_lines(iter(lines(CHAT, PAIR)), "support-bot", TIER, NOW)
    assert parsed.bad == []
    chat, pair = parsed.interactions
    assert chat.served_by == "teacher" and chat.route_reason == "imported" and chat.training_candidate
    assert [m.role for m in chat.messages] == ["system", "user"] and chat.received_at == NOW
    assert chat.teacher is not None and '"card_arrival"' in (chat.teacher.content or "")
    assert chat.teacher.input_tokens > 0 and chat.cost_usd == chat.teacher_only_cost_usd > 0
    assert pair.messages[0].content == "Freeze my card please"
    assert pair.teacher is not None and pair.teacher.tool_calls[0].name == "freeze_card"
    assert (pair.teacher.input_tokens, pair.teacher.output_tokens) == (31, 9)
    assert pair.teacher.model == "gpt-4o-2024-08-06" and pair.teacher.finish_reason == "tool_calls"
    assert pair.received_at == datetime.fromtimestamp(1765000000, timezone.utc)
    assert pair.tools is not None and "freeze_card" in pair.tools


def test_the_same_line_gets_the_same_request_id_and_another_agent_another() -> None:
    first = parse_lines(iter(lines(CHAT)), "support-bot", TIER, NOW).interactions[0]
    again = parse_lines(iter(lines(CHAT)), "support-bot", TIER, datetime.now(timezone.utc)).interactions[0]
    other = parse_lines(iter(lines(CHAT)), "other-bot", TIER, NOW).interactions[0]
    assert first.request_id == again.request_id != other.request_id


def test_bad_lines_are_reported_with_numbers_and_reasons_and_good_ones_kept() -> None:
    parsed = parse_lines(
        iter(
            lines(
                CHAT,
                "{not json",
                [1, 2],
                {"messages": [{"role": "user", "content": "hi"}]},
                {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
                {"request": {"messages": [{"role": "user", "content": "x"}]}, "response": {"choices": []}},
                {"prompt": "x", "completion": "y"},
                "",
                PAIR,
            )
        ),
        "support-bot",
        TIER,
        NOW,
    )
    assert len(parsed.interactions) == 2
    reasons = {b.number: b.reason for b in parsed.bad}
    assert set(reasons) == {2, 3, 4, 5, 6, 7}
    assert reasons[2].startswith("not JSON") and "assistant" in reasons[4] and "wizard" in reasons[5]
    assert "choices" in reasons[6] and "neither" in reasons[7]
