"""The OpenAI-compatible client (the ``openai`` SDK) against a scripted local aiohttp server: retries on 429
(honouring Retry-After) and 5xx, non-retryable 4xx with the server's message, tool calls both ways, usage,
timeouts, an unreachable URL, the per-agent options (reasoning models, response_format, headers, query, the key's
header); and the pure helpers (tool definitions, error bodies)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import SecretStr

from services.core.records import ChatMessage
from services.core.settings import Settings
from services.stack.process import free_port
from services.teacher.base import Completion, Teacher, TeacherError, teacher_from_settings
from services.teacher.openai_client import (
    OpenAICompatibleTeacher,
    server_error_message,
    tools_payload,
)

KEY = "sk-test-secret-0123456789"
MESSAGES = [
    ChatMessage(role="system", content="Answer in JSON."),
    ChatMessage(role="user", content="Where is my card?"),
]


def ok_body(content: str | None = '{"intent": "card_arrival"}', **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "served-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28},
    }


Reply = Callable[[], web.Response | Any]


@dataclass
class Scripted:
    """A chat-completions server answering from a script, one entry per request (the last one repeats)."""

    url: str = ""
    script: list[Reply] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    headers: list[CIMultiDict[str]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(await request.json())
        self.headers.append(CIMultiDict(request.headers))  # header names are case-insensitive
        self.queries.append(dict(request.query))
        self.times.append(time.monotonic())
        reply = self.script[min(len(self.seen) - 1, len(self.script) - 1)]
        result = reply()
        if asyncio.iscoroutine(result):
            result = await result
        return result


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    async for scripted in _serve():
        yield scripted


@pytest.fixture
async def other_server() -> AsyncIterator[Scripted]:
    async for scripted in _serve():
        yield scripted


async def _serve() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    scripted.url = f"http://127.0.0.1:{port}/v1"
    yield scripted
    await runner.cleanup()


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return lambda: web.json_response(body, status=status, headers=headers)


def client(url: str, **kwargs: Any) -> OpenAICompatibleTeacher:
    return OpenAICompatibleTeacher(url, **kwargs)


async def test_request_body_headers_and_answer(server: Scripted) -> None:
    server.script = [json_reply(ok_body())]
    async with client(server.url, api_key=SecretStr(KEY), headers={"X-Reference-Flaws": "0"}) as teacher:
        assert isinstance(teacher, Teacher) and KEY not in repr(teacher)
        msgs = [*MESSAGES, ChatMessage(role="tool", content="{}", name="lookup", tool_call_id="call_9")]
        done = await teacher.complete(msgs, model="gpt-4o-mini", temperature=0.2, max_tokens=64)
    assert done == Completion(
        content='{"intent": "card_arrival"}',
        tool_calls=[],
        model="served-model",
        input_tokens=21,
        output_tokens=7,
        latency_ms=done.latency_ms,
        finish_reason="stop",
    )
    assert done.latency_ms > 0
    body, headers = server.seen[0], server.headers[0]
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Where is my card?"},
            {"role": "tool", "content": "{}", "name": "lookup", "tool_call_id": "call_9"},
        ],
        "temperature": 0.2,
        "max_tokens": 64,
    }
    assert headers["Authorization"] == f"Bearer {KEY}" and headers["X-Reference-Flaws"] == "0"


async def test_no_key_no_authorization_header(server: Scripted) -> None:
    server.script = [json_reply(ok_body())]
    async with client(server.url) as teacher:
        await teacher.complete(MESSAGES, model="m")
    assert "Authorization" not in server.headers[0]
    assert "tools" not in server.seen[0] and "max_tokens" not in server.seen[0]


async def test_429_is_retried_after_the_servers_retry_after(server: Scripted) -> None:
    limited = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    server.script = [json_reply(limited, 429, {"Retry-After": "1"}), json_reply(ok_body())]
    async with client(server.url) as teacher:
        done = await teacher.complete(MESSAGES, model="m")
    assert done.content == '{"intent": "card_arrival"}'
    assert len(server.seen) == 2
    assert server.times[1] - server.times[0] >= 0.95  # the server asked for one second
    assert done.latency_ms >= 950  # what the caller waited, retries included


async def test_500_is_retried_with_backoff(server: Scripted) -> None:
    server.script = [json_reply({"error": {"message": "boom"}}, 500), json_reply(ok_body())]
    async with client(server.url) as teacher:
        done = await teacher.complete(MESSAGES, model="m")
    assert done.output_tokens == 7 and len(server.seen) == 2


async def test_retries_give_up_with_a_retryable_error(server: Scripted) -> None:
    server.script = [json_reply({"message": "model overloaded"}, 503)]  # vLLM's error shape
    async with client(server.url, max_retries=2) as teacher:
        with pytest.raises(TeacherError) as err:
            await teacher.complete(MESSAGES, model="m")
    assert len(server.seen) == 3
    assert err.value.retryable and err.value.status == 503
    assert "after 3 attempts" in str(err.value) and "model overloaded" in str(err.value)
    assert server.url in str(err.value)


async def test_400_is_not_retried_and_the_servers_message_surfaces(server: Scripted) -> None:
    bad = {"error": {"message": "'messages' must contain the word 'json'", "type": "invalid_request_error"}}
    server.script = [json_reply(bad, 400)]
    async with client(server.url, api_key=KEY) as teacher:
        with pytest.raises(TeacherError) as err:
            await teacher.complete(MESSAGES, model="m")
    assert len(server.seen) == 1
    assert err.value.status == 400 and not err.value.retryable
    assert "'messages' must contain the word 'json'" in str(err.value) and server.url in str(err.value)
    assert KEY not in str(err.value)


async def test_tool_call_answer(server: Scripted) -> None:
    call = {"id": "call_abc", "type": "function", "function": {"name": "card_block", "arguments": '{"card": "1"}'}}
    body = ok_body(None, tool_calls=[call])
    body["choices"][0]["finish_reason"] = "tool_calls"
    server.script = [json_reply(body)]
    tools = json.dumps([{"type": "function", "function": {"name": "card_block", "parameters": {"type": "object"}}}])
    async with client(server.url) as teacher:
        done = await teacher.complete(MESSAGES, model="m", tools=tools)
    assert done.content is None and done.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [("call_abc", "card_block", '{"card": "1"}')]
    assert server.seen[0]["tools"] == json.loads(tools)


async def test_object_arguments_and_missing_usage_are_tolerated(server: Scripted) -> None:
    # Some servers (Ollama's native shape, proxies) give arguments as an object and report no usage.
    call = {"function": {"name": "card_block", "arguments": {"card": "1"}}}
    body = ok_body("ok", tool_calls=[call])
    del body["usage"]
    server.script = [json_reply(body)]
    async with client(server.url) as teacher:
        done = await teacher.complete(MESSAGES, model="m")
    assert done.tool_calls[0].arguments == '{"card":"1"}' and done.tool_calls[0].id == "call_0"
    assert done.input_tokens == (len("Answer in JSON.Where is my card?") + 3) // 4
    assert done.output_tokens > 0


async def test_an_unreadable_answer_is_a_clear_error(server: Scripted) -> None:
    server.script = [json_reply({"object": "chat.completion", "choices": []})]
    async with client(server.url) as teacher:
        with pytest.raises(TeacherError, match="unreadable answer for model 'm': the response has no choices"):
            await teacher.complete(MESSAGES, model="m")


async def test_a_slow_server_times_out_and_is_retried(server: Scripted) -> None:
    async def slow() -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response(ok_body())

    server.script = [slow, json_reply(ok_body())]
    async with client(server.url, timeout_s=0.2) as teacher:
        done = await teacher.complete(MESSAGES, model="m")
    assert done.content and len(server.seen) == 2
    server.script, server.seen = [slow], []
    async with client(server.url, timeout_s=0.2, max_retries=0) as teacher:
        with pytest.raises(TeacherError, match=r"no answer within 0\.2s") as err:
            await teacher.complete(MESSAGES, model="m")
    assert err.value.retryable and err.value.status is None


async def test_an_unreachable_url_is_named_in_the_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with client(url, max_retries=1) as teacher:
        with pytest.raises(TeacherError) as err:
            await teacher.complete(MESSAGES, model="m")
    assert err.value.retryable and err.value.status is None
    assert f"{url}/chat/completions" in str(err.value) and "cannot connect" in str(err.value)


async def test_unusable_tools_text_is_refused_before_sending(server: Scripted) -> None:
    async with client(server.url) as teacher:
        with pytest.raises(TeacherError, match="tools are not usable") as err:
            await teacher.complete(MESSAGES, model="m", tools="{not json")
    assert not err.value.retryable and server.seen == []


async def test_teacher_from_settings_points_at_the_teacher_url(server: Scripted) -> None:
    server.script = [json_reply(ok_body())]
    settings = Settings(teacher_url=server.url, teacher_api_key=SecretStr(KEY))
    teacher = teacher_from_settings(settings, model_timeout_s=5)
    try:
        await teacher.complete(MESSAGES, model="m")
    finally:
        await teacher.aclose()
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"


async def test_each_teacher_url_gets_its_own_key_and_the_global_key_stays_home(
    server: Scripted, other_server: Scripted
) -> None:
    from services.core.agents import TeacherConfig
    from services.teacher.base import teacher_address, teacher_credentials, teachers_for

    for s in (server, other_server):
        s.script = [json_reply(ok_body())]
    settings = Settings(teacher_url=server.url, teacher_api_key=SecretStr(KEY))
    agents = [
        ("support-bot", TeacherConfig()),  # the global teacher
        ("acme-bot", TeacherConfig(url=other_server.url + "/", api_key_env="ACME_TEACHER_KEY")),
        # Its own URL (the same server by another name), no key named: none is sent.
        ("open-bot", TeacherConfig(url=other_server.url.replace("127.0.0.1", "localhost"))),
    ]
    teachers = teachers_for(settings, agents, {"ACME_TEACHER_KEY": "sk-acme-777"}, model_timeout_s=5)
    try:
        for _, cfg in agents:
            await teachers[teacher_address(settings, cfg)].complete(MESSAGES, model="m")
    finally:
        for teacher in teachers.values():
            await teacher.aclose()
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}" and len(server.seen) == 1
    assert other_server.headers[0]["Authorization"] == "Bearer sk-acme-777"
    assert "Authorization" not in other_server.headers[1] and len(other_server.seen) == 2
    # A key variable that is not set, and two keys for one URL, are refused naming the agent.
    with pytest.raises(
        ValueError,
        match=re.escape("agents.acme-bot.teacher.api_key_env: the environment variable ACME_TEACHER_KEY is not set"),
    ):
        teacher_credentials(settings, agents[1:2], {})
    twice = [*agents[1:2], ("rival-bot", TeacherConfig(url=other_server.url, api_key_env="RIVAL_KEY"))]
    with pytest.raises(ValueError, match=r"agents\.rival-bot\.teacher: .* is also the teacher of agent acme-bot"):
        teacher_credentials(settings, twice, {"ACME_TEACHER_KEY": "a", "RIVAL_KEY": "b"})
    with pytest.raises(ValueError, match="api_key_env"):
        TeacherConfig(url=other_server.url, api_key_env="not a name")


async def test_a_reasoning_teacher_gets_its_own_parameters_schema_headers_and_query(server: Scripted) -> None:
    from services.core.agents import AgentConfig
    from services.teacher.base import teacher_options

    schema = {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]}
    agent = AgentConfig.model_validate(
        {
            "agent_id": "acme-bot",
            "teacher": {
                "model": "o4-mini",
                "max_tokens": 300,
                "reasoning": True,
                "reasoning_effort": "low",
                "response_format": "json_schema",
                "headers": {"X-Team": "support"},
                "query": {"api-version": "2025-04-01-preview"},
            },
            "output": {"json_schema": schema},
        }
    )
    server.script = [json_reply(ok_body())]
    async with client(server.url, api_key=KEY, api_key_header="api-key") as teacher:
        await teacher.complete(
            MESSAGES, model="o4-mini", max_tokens=agent.teacher.max_tokens, options=teacher_options(agent)
        )
    body, headers = server.seen[0], server.headers[0]
    assert "temperature" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == 300 and body["reasoning_effort"] == "low"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "acme-bot", "schema": schema, "strict": False},
    }
    # Azure's way: the key in api-key, no Authorization; the agent's header and api-version go along.
    assert headers["api-key"] == KEY and "Authorization" not in headers and headers["X-Team"] == "support"
    assert server.queries[0] == {"api-version": "2025-04-01-preview"}


def test_teacher_settings_that_cannot_work_are_refused_naming_the_key() -> None:
    from pydantic import ValidationError

    from services.core.agents import AgentConfig, TeacherConfig

    with pytest.raises(ValidationError, match="reasoning_effort is only sent to a reasoning model"):
        TeacherConfig(reasoning_effort="high")
    with pytest.raises(
        ValidationError, match=re.escape("response_format json_schema sends output.json_schema, which is empty")
    ):
        AgentConfig(agent_id="a", teacher=TeacherConfig(response_format="json_schema"))
    with pytest.raises(ValidationError, match="api_key_header"):
        TeacherConfig(api_key_header="api key: x")


async def test_a_tool_conversation_goes_back_as_it_came(server: Scripted) -> None:
    from services.core.records import ToolCall

    server.script = [json_reply(ok_body("Your card is blocked."))]
    call = ToolCall(id="call_1", name="card_block", arguments='{"card": "1234"}')
    msgs = [
        *MESSAGES,
        ChatMessage(role="assistant", content="", tool_calls=[call]),
        ChatMessage(role="tool", content='{"blocked": true}', tool_call_id="call_1"),
    ]
    async with client(server.url) as teacher:
        done = await teacher.complete(msgs, model="m")
    assert done.content == "Your card is blocked."
    assert server.seen[0]["messages"][2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "card_block", "arguments": '{"card": "1234"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"blocked": true}', "tool_call_id": "call_1"},
    ]


def test_one_teacher_url_sends_its_key_one_way() -> None:
    from services.core.agents import TeacherConfig
    from services.teacher.base import teachers_for

    settings = Settings(teacher_url="http://127.0.0.1:9/v1")
    agents = [("a-bot", TeacherConfig(api_key_header="api-key")), ("b-bot", TeacherConfig())]
    with pytest.raises(
        ValueError, match=r"agents\.b-bot\.teacher\.api_key_header: .* is also the teacher of agent a-bot"
    ):
        teachers_for(settings, agents, {})


# Pure helpers -----------------------------------------------------------------------------------------------


def test_tools_payload_accepts_the_usual_shapes() -> None:
    fn = {"name": "card_block", "parameters": {"type": "object"}}
    wrapped = [{"type": "function", "function": fn}]
    assert tools_payload(json.dumps(wrapped)) == wrapped
    assert tools_payload(json.dumps([fn])) == wrapped
    assert tools_payload(json.dumps({"tools": [fn]})) == wrapped
    assert tools_payload('["card_block"]') == wrapped
    assert tools_payload(None) is None and tools_payload("  ") is None and tools_payload("[]") is None
    with pytest.raises(ValueError):
        tools_payload("[42]")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad model", "type": "invalid_request_error"}}', "bad model"),
        (b'{"object": "error", "message": "vllm says no"}', "vllm says no"),
        (b'{"error": "ollama says no"}', "ollama says no"),
        (b'{"detail": "not found"}', "not found"),
        (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
        (b"", "(empty body)"),
    ],
)
def test_server_error_message(body: bytes, message: str) -> None:
    assert server_error_message(body) == message
