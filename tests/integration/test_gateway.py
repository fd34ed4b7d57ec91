"""The OpenAI-compatible gateway on the real local stack, with the official ``openai`` SDK as the client: plain and
streamed answers, tool calls, the models list, API keys per agent and OpenAI-style errors."""

from __future__ import annotations

import json
import uuid

import openai
import pytest
import yaml

from services.core.settings import Settings

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
AGENT = f"gated-{RUN}"
OTHER = f"other-{RUN}"
TOOLS = [{"type": "function", "function": {"name": "card_delivery_status", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def gateway(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory):
    from tests.conftest import start_services

    home = tmp_path_factory.mktemp("gateway")
    agents_file = home / "agents.yaml"
    agents = {name: {"mode": "teacher", "teacher": {"model": "reference/banking77"}} for name in (AGENT, OTHER)}
    agents_file.write_text(yaml.safe_dump({"agents": agents}))
    keys_file = home / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({AGENT: ["key-a"], "*": ["key-admin"]}))
    svc = settings.model_copy(update={"agents_file": agents_file, "gateway_keys_file": keys_file})
    start_services(stack_manager, svc, ("logger", "router", "gateway"))
    yield svc
    stack_manager.stop("gateway")


def sdk(settings: Settings, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{settings.gateway_url}/v1", api_key=key, max_retries=0, timeout=120)


def test_the_openai_sdk_gets_an_answer_plain_and_streamed(gateway: Settings) -> None:
    client = sdk(gateway, "key-a")
    raw = client.chat.completions.with_raw_response.create(
        model=AGENT, messages=[{"role": "user", "content": "My card has not arrived yet"}]
    )
    answer = raw.parse()
    assert raw.headers["x-flywheel-served-by"] == "teacher" and raw.headers["x-flywheel-request-id"]
    assert answer.choices[0].finish_reason == "stop" and answer.model == AGENT
    assert '"intent"' in (answer.choices[0].message.content or "") and answer.usage.total_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=AGENT,
            messages=[{"role": "user", "content": "My card has not arrived yet"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert '"intent"' in text and chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is not None


def test_tools_come_back_as_tool_calls(gateway: Settings) -> None:
    answer = sdk(gateway, "key-admin").chat.completions.create(
        model=AGENT, messages=[{"role": "user", "content": "My card has not arrived yet"}], tools=TOOLS
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name and isinstance(json.loads(call.function.arguments), dict)


def test_models_keys_and_errors(gateway: Settings) -> None:
    assert [m.id for m in sdk(gateway, "key-a").models.list()] == [AGENT]
    assert {m.id for m in sdk(gateway, "key-admin").models.list()} == {AGENT, OTHER}
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "key-a").chat.completions.create(model=OTHER, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk(gateway, "key-admin").chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="no user message"):
        sdk(gateway, "key-a").chat.completions.create(model=AGENT, messages=[{"role": "system", "content": "x"}])
