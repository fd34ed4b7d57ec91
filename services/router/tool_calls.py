"""A student's answer in the shape a teacher gives it: when the request offered tools and the student's JSON
answer names one of them, the answer carries that tool call (as the teacher's would), so a client sees the same
response shape whoever served it (pure)."""

from __future__ import annotations

import json
from typing import Any

from services.core.records import ToolCall


def offered_tools(tools: str | None) -> set[str]:
    """The function names of a request's OpenAI-style ``tools`` (empty when none or unreadable)."""
    if not tools:
        return set()
    try:
        items = json.loads(tools)
    except ValueError:
        return set()
    names = set()
    for item in items if isinstance(items, list) else []:
        function = item.get("function", item) if isinstance(item, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def student_tool_calls(content: str | None, tools: str | None) -> list[ToolCall]:
    """The tool call a student's answer makes, if the request offered that tool: ``{"tool": ..., "arguments":
    {...}}`` in its JSON content, as the teacher's ``call_0``."""
    names = offered_tools(tools)
    if not names or not content:
        return []
    try:
        answer: Any = json.loads(content)
    except ValueError:
        return []
    tool = answer.get("tool") if isinstance(answer, dict) else None
    if not isinstance(tool, str) or tool not in names:
        return []
    arguments = answer.get("arguments")
    return [ToolCall(id="call_0", name=tool, arguments=json.dumps(arguments if isinstance(arguments, dict) else {}))]
