"""The gateway's conversions between the OpenAI chat-completions shapes and the flywheel's records (pure)."""

from __future__ import annotations

import pytest

from services.core.records import InferenceResponse, ToolCall
from services.core.settings import Settings
from services.gateway.service import Keys, unsafe_bind
from services.openai_shape import ShapeError, completion, error_body, request_from_body, stream_chunks

BODY = {
    "model": "support-bot",
    "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Where is my card?"}]},
    ],
    "tools": [{"type": "function", "function": {"name": "card_delivery_status"}}],
    "user": "conv-7",
}


def test_a_body_becomes_a_request_for_the_agent_it_names() -> None:
    request = request_from_body(BODY)
    assert request.agent_id == "support-bot" and request.conversation_id == "conv-7"
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Where is my card?")]
    assert request.tools is not None and "card_delivery_status" in request.tools
    assert request_from_body(BODY, "from-header").conversation_id == "from-header"


def test_a_tool_conversation_keeps_the_assistants_tool_calls() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "card_block", "arguments": {"card": "1"}}}
    turns = [
        {"role": "user", "content": "Block my card"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
        {"role": "user", "content": "Thanks, and a new one?"},
    ]
    request = request_from_body({"model": "support-bot", "messages": turns})
    assistant = request.messages[1]
    assert assistant.content == "" and assistant.tool_calls == [
        ToolCall(id="call_1", name="card_block", arguments='{"card":"1"}')
    ]
    assert request.messages[2].tool_call_id == "call_1" and request.messages[0].tool_calls == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model is required"),
        ({"model": "a", "messages": []}, "non-empty"),
        ({"model": "a", "messages": [{"role": "system", "content": "x"}]}, "no user message"),
        ({"model": "a", "messages": [{"role": "user", "content": 3}]}, "content must be text"),
        ({"model": "a", "n": 2, "messages": [{"role": "user", "content": "x"}]}, "n must be 1"),
        (
            {"model": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{}]}]},
            r"messages\[1\]\.tool_calls\[0\] has no function name",
        ),
    ],
)
def test_bad_bodies_say_what_is_wrong(body: dict, reason: str) -> None:
    with pytest.raises(ShapeError, match=reason):
        request_from_body(body)


def test_a_response_with_a_tool_call_has_the_openai_shape_and_streams() -> None:
    request = request_from_body(BODY)
    response = InferenceResponse(
        request_id=request.request_id,
        conversation_id=request.conversation_id,
        agent_id="support-bot",
        content='{"intent": "card_arrival"}',
        tool_calls=[ToolCall(id="call_0", name="card_delivery_status", arguments="{}")],
        served_by="student",
        model_version="3",
    )
    done = completion(response, request)
    choice = done["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and done["object"] == "chat.completion"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "card_delivery_status", "arguments": "{}"}
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"] > 0
    chunks = stream_chunks(done)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == done["id"] for c in chunks)
    assert error_body("x", "invalid_request_error")["error"]["type"] == "invalid_request_error"
    # The serving model's own counts and reason, when the response carries them (schema v2).
    counted = response.model_copy(
        update={"tool_calls": [], "input_tokens": 31, "output_tokens": 9, "finish_reason": "length"}
    )
    done = completion(counted, request)
    assert done["usage"] == {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}
    assert done["choices"][0]["finish_reason"] == "length"


def test_keys_per_agent_and_no_public_bind_without_keys(tmp_path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("billing-bot: [kb]\n")
    keys = Keys.from_settings(Settings(gateway_api_keys="support-bot=k1,*=admin", gateway_keys_file=keys_file))
    assert keys.allows("k1", "support-bot") and not keys.allows("k1", "billing-bot")
    assert keys.allows("admin", "billing-bot") and keys.allows("kb", "billing-bot") and not keys.allows("", "x")
    assert keys.agents_for("kb", ["billing-bot", "support-bot"]) == ["billing-bot"]
    assert unsafe_bind("0.0.0.0", Keys({})) is not None and unsafe_bind("127.0.0.1", Keys({})) is None
    assert unsafe_bind("0.0.0.0", keys) is None
