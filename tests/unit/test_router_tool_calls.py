"""A student's answer carries the tool call a teacher's would (issue 15: the same shape whoever served)."""

from __future__ import annotations

import json

from services.router.tool_calls import offered_tools, student_tool_calls

TOOLS = json.dumps([{"type": "function", "function": {"name": "card_delivery_status", "parameters": {}}}])
ANSWER = json.dumps({"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {"card": "visa"}})


def test_a_tool_the_request_offered_becomes_a_tool_call() -> None:
    (call,) = student_tool_calls(ANSWER, TOOLS)
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_0", "card_delivery_status", {"card": "visa"})


def test_no_tool_call_without_tools_or_for_a_tool_not_offered() -> None:
    assert student_tool_calls(ANSWER, None) == []
    other = json.dumps([{"type": "function", "function": {"name": "freeze_card"}}])
    assert student_tool_calls(ANSWER, other) == []
    assert student_tool_calls("not json", TOOLS) == [] and student_tool_calls(None, TOOLS) == []
    assert offered_tools("{broken") == set() and offered_tools(TOOLS) == {"card_delivery_status"}
