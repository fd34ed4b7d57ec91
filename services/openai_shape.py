"""The OpenAI chat-completions shapes and the flywheel's records, both ways (pure): the gateway's requests and
responses, and the history importer's lines."""

from __future__ import annotations

import json
import time
from typing import Any

from services.core.records import ChatMessage, InferenceRequest, InferenceResponse, ToolCall, new_id
from services.teacher.base import approx_tokens, messages_tokens

ROLES = ("system", "user", "assistant", "tool")


class ShapeError(ValueError):
    """A request body (or history line) that is not a chat completion request; the message says where."""


def text_of(content: Any) -> Any:
    """A message's content as text: content parts keep their text parts (images and audio have none here)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def chat_message(raw: Any, index: int) -> ChatMessage:
    if not isinstance(raw, dict):
        raise ShapeError(f"messages[{index}] is not an object")
    role = raw.get("role")
    if role == "developer":
        role = "system"  # the newer name for the system role
    if role not in ROLES:
        raise ShapeError(f"messages[{index}]: unknown role {role!r}")
    calls = message_tool_calls(raw.get("tool_calls"), f"messages[{index}]") if role == "assistant" else []
    content = text_of(raw.get("content"))
    if content is None and calls:
        content = ""  # an assistant turn that only calls tools
    if not isinstance(content, str):
        raise ShapeError(f"messages[{index}]: content must be text")
    return ChatMessage(
        role=role, content=content, name=raw.get("name"), tool_call_id=raw.get("tool_call_id"), tool_calls=calls
    )


def message_tool_calls(raw: Any, where: str) -> list[ToolCall]:
    """An assistant message's ``tool_calls`` (OpenAI shape) as records; arguments stay JSON text. ``where`` names
    the message in errors (``messages[2]``)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ShapeError(f"{where}.tool_calls must be a list")
    calls = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ShapeError(f"{where}.tool_calls[{j}] has no function name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):  # some clients send an object; the contract is JSON text
            args = json.dumps(args, separators=(",", ":"))
        calls.append(ToolCall(id=str(call.get("id") or f"call_{j}"), name=fn["name"], arguments=args))
    return calls


def tool_calls_payload(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Tool call records in the OpenAI shape (what a response or a sent-back assistant turn carries)."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def chat_messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise ShapeError("messages must be a non-empty list")
    messages = [chat_message(m, i) for i, m in enumerate(raw)]
    if not any(m.role == "user" for m in messages):
        raise ShapeError("messages hold no user message")
    return messages


def tools_text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw if isinstance(raw, str) else json.dumps(raw)


def request_from_body(body: Any, conversation_id: str | None = None) -> InferenceRequest:
    """A chat completion request body as the flywheel's request (``model`` names the agent)."""
    if not isinstance(body, dict):
        raise ShapeError("the body must be a JSON object")
    agent = body.get("model")
    if not isinstance(agent, str) or not agent:
        raise ShapeError("model is required: it names the agent")
    if body.get("n", 1) != 1:
        raise ShapeError("n must be 1")
    request_id = new_id()
    user = body.get("user")
    return InferenceRequest(
        request_id=request_id,
        conversation_id=conversation_id or (user if isinstance(user, str) and user else request_id),
        agent_id=agent,
        messages=chat_messages(body.get("messages")),
        tools=tools_text(body.get("tools")),
        metadata={"source": "gateway"},
    )


def completion(response: InferenceResponse, request: InferenceRequest) -> dict[str, Any]:
    """The response as a ``chat.completion`` object. ``usage`` is what the serving model read and wrote (the
    teacher's own report, the student's real prompt and generated tokens); where no model counted (a plan's
    combined answer), it is counted the platform's way, about four characters a token."""
    calls = tool_calls_payload(response.tool_calls)
    message: dict[str, Any] = {"role": "assistant", "content": response.content}
    if calls:
        message["tool_calls"] = calls
    prompt = response.input_tokens or messages_tokens(request.messages)
    answer = response.output_tokens or approx_tokens(
        (response.content or "") + "".join(c.arguments for c in response.tool_calls)
    )
    # A student answer that names a tool becomes a tool call (router.tool_calls): its reason says so too.
    finish = "tool_calls" if calls else (response.finish_reason or "stop")
    return {
        "id": f"chatcmpl-{response.request_id}",
        "object": "chat.completion",
        "created": int(response.created_at.timestamp()),
        "model": request.agent_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer},
        "system_fingerprint": f"{response.served_by}:{response.model_version or '-'}",
    }


def stream_chunks(done: dict[str, Any]) -> list[dict[str, Any]]:
    """A completion as ``chat.completion.chunk`` events: the role, the content, the tool calls, the finish."""
    choice = done["choices"][0]
    message = choice["message"]
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"], "model": done["model"]}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        chunks.append(chunk({"content": message["content"]}))
    if message.get("tool_calls"):
        chunks.append(chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}))
    chunks.append(chunk({}, choice["finish_reason"], usage=done["usage"]))
    return chunks


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape (``{"error": {...}}``), which the SDKs turn into their exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_list(agent_ids: list[str]) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": a, "object": "model", "created": created, "owned_by": "slm-flywheel"} for a in agent_ids],
    }
