"""PROMPT strings: parsing, validation, chat rendering, the shared system prefix and truncation.

A PROMPT is UTF-8 text. When it parses as JSON and is a list of chat messages (``[{"role", "content"}, ...]``)
or an object ``{"messages": [...], "tools": [...]}``, it is rendered with the tokenizer's chat template; anything
else is an already-formatted prompt, tokenised as is.

Truncation has one rule, applied by the trainer to every training prompt and by serving to every request, so a
long conversation is seen at serving exactly as in training: a prompt over ``limit`` tokens keeps the shared
prefix (the system prompt and the turn header that every prompt of the version starts with) and as many of
its last tokens as fit (the newest turn and the generation prompt).
"""

from __future__ import annotations

import json
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_PROMPT_CHARS = 65536  # a PROMPT longer than this is refused before tokenising (a client bug, not a message)


class PromptError(ValueError):
    """A PROMPT that cannot be answered; the message names the problem (returned to the client)."""


def parse_prompt(raw: str) -> tuple[list[dict[str, Any]] | None, list[Any] | None]:
    """(messages, tools) when ``raw`` is JSON chat messages, else (None, None): a pre-formatted prompt.

    Raises ``PromptError`` for an empty or over-long prompt, an empty message list, a message with an unknown
    role or content that is not text."""
    if not raw or not raw.strip():
        raise PromptError("PROMPT is empty")
    if len(raw) > MAX_PROMPT_CHARS:
        raise PromptError(f"PROMPT is {len(raw)} characters long, over the limit of {MAX_PROMPT_CHARS}")
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None, None
    tools = None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        tools = data.get("tools") if isinstance(data.get("tools"), list) else None
        data = data["messages"]
        if not data:
            raise PromptError("PROMPT has an empty message list")
    if not (isinstance(data, list) and data and all(isinstance(m, dict) and "role" in m for m in data)):
        return None, None
    messages = []
    for index, message in enumerate(data):
        role = message.get("role")
        if role not in ROLES:
            raise PromptError(f"message {index} has an unknown chat role {role!r} (known: {', '.join(sorted(ROLES))})")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise PromptError(f"message {index} ({role}) has content of type {type(content).__name__}, not text")
        messages.append({**message, "content": content or ""})
    return messages, tools


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    system_prompt: str | None = None,
    tools: list | None = None,
) -> str:
    """The prompt text the student sees for chat ``messages`` (the trainer trains on this rendering)."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        return str(tokenizer.apply_chat_template(messages, **kwargs))
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def shared_prefix_ids(tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The token ids every rendered one-user-turn prompt of this system prompt starts with (the system turn and
    the user turn's header): the longest common prefix of two renderings that differ only in the message."""
    probes = [
        tokenizer.encode(
            render_prompt(tokenizer, [{"role": "user", "content": text}], system_prompt), add_special_tokens=False
        )
        for text in ("Alpha", "zulu 9")
    ]
    common = 0
    for a, b in zip(*probes, strict=False):
        if a != b:
            break
        common += 1
    return list(probes[0][:common])


def fit_prompt(ids: list[int], limit: int | None, prefix_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
    """``ids`` cut to at most ``limit`` tokens: ``prefix_ids`` kept when the prompt starts with them (the
    system prompt every prompt of the version shares), then the last tokens that fit."""
    if not limit or len(ids) <= limit:
        return list(ids)
    head = len(prefix_ids) if prefix_ids and list(ids[: len(prefix_ids)]) == list(prefix_ids) else 0
    head = max(0, min(head, limit - 1))
    tail = limit - head
    return list(ids[:head]) + list(ids[len(ids) - tail :])
