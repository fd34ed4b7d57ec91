"""The reference teacher as the local stack runs it (``python -m services.teacher`` under the process
manager), spoken to by the OpenAI-compatible client exactly as the router speaks to any teacher."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.core.records import ChatMessage
from services.core.settings import Settings
from services.teacher.base import TeacherError, teacher_from_settings
from services.teacher.openai_client import OpenAICompatibleTeacher
from services.teacher.reference import normalise
from services.teacher.workloads import load_workloads

pytestmark = pytest.mark.integration

QUIET = {"X-Reference-Flaws": "0", "X-Reference-Latency-Ms": "0"}  # exact answers, no waiting


def user(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="You are a bank's support agent."),
        ChatMessage(role="user", content=text),
    ]


@pytest.fixture
async def quiet(teacher, settings: Settings) -> AsyncIterator[OpenAICompatibleTeacher]:
    client = OpenAICompatibleTeacher(settings.teacher_url, settings.teacher_api_key, headers=QUIET, max_retries=0)
    yield client
    await client.aclose()


@pytest.mark.parametrize("name", ["banking77", "nlupp"])
@pytest.mark.parametrize("with_tools", [False, True])
async def test_both_workloads_answer_gold_labels(
    quiet: OpenAICompatibleTeacher, settings: Settings, name: str, with_tools: bool
) -> None:
    workload = load_workloads(settings.data_dir)[name]
    tools = json.dumps([{"type": "function", "function": {"name": t}} for t in workload.tools]) if with_tools else None
    counts = Counter(normalise(ex.text) for ex in workload.examples())
    unique = [ex for ex in workload.examples("test") if counts[normalise(ex.text)] == 1]  # a few texts repeat
    for ex in unique[:: len(unique) // 12][:12]:
        done = await quiet.complete(user(ex.text), model=f"reference/{name}", tools=tools)
        data = json.loads(done.content)
        assert workload.check_output(done.content) == []
        assert data["intent"] == ex.intent and data["arguments"] == workload.answer_for(ex)["arguments"]
        assert data["tool"] == workload.tool_for_intent(data["intent"])
        assert done.model == f"reference/{name}" and done.input_tokens > 0 and done.output_tokens > 0
        if with_tools:
            assert done.finish_reason == "tool_calls"
            assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [(data["tool"], data["arguments"])]
        else:
            assert done.finish_reason == "stop" and done.tool_calls == []


async def test_the_latency_header_is_honoured(teacher, settings: Settings) -> None:
    slow = OpenAICompatibleTeacher(
        settings.teacher_url,
        headers={"X-Reference-Flaws": "0", "X-Reference-Latency-Ms": "300", "X-Reference-Latency-Sigma": "0"},
    )
    fast = OpenAICompatibleTeacher(settings.teacher_url, headers=QUIET)
    try:
        await fast.complete(user("warm up"), model="reference/banking77")
        t0 = time.perf_counter()
        await slow.complete(user("I am still waiting on my card?"), model="reference/banking77")
        assert 0.29 <= time.perf_counter() - t0 < 1.5
        t0 = time.perf_counter()
        await fast.complete(user("I am still waiting on my card?"), model="reference/banking77")
        assert time.perf_counter() - t0 < 0.2
    finally:
        await slow.aclose()
        await fast.aclose()


async def test_unknown_model_is_a_404_naming_the_model(teacher, settings: Settings) -> None:
    client = teacher_from_settings(settings)
    try:
        with pytest.raises(TeacherError) as err:
            await client.complete(user("hello"), model="gpt-4o")
    finally:
        await client.aclose()
    assert err.value.status == 404 and not err.value.retryable
    assert "gpt-4o" in str(err.value) and "reference/banking77" in str(err.value)


async def test_the_stack_teacher_answers_deterministically(teacher, settings: Settings) -> None:
    # The stack's teacher runs with the settings' latency and flaw rate; the same message, the same answer.
    client = teacher_from_settings(settings)
    try:
        texts = [ex.text for ex in load_workloads(settings.data_dir)["banking77"].examples("test")[:40]]
        first = [(await client.complete(user(t), model="reference/banking77")).content for t in texts]
        again = [(await client.complete(user(t), model="reference/banking77")).content for t in texts]
    finally:
        await client.aclose()
    assert first == again


async def test_models_health_and_refusals_over_plain_http(teacher, settings: Settings) -> None:
    base = settings.teacher_url
    root = base.rsplit("/v1", 1)[0]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/models") as resp:
            assert resp.status == 200
            # The built-in workloads first; data sets registered by other tests of the session may follow.
            assert [m["id"] for m in (await resp.json())["data"]][:2] == ["reference/banking77", "reference/nlupp"]
        async with http.get(f"{root}/health") as resp:
            health = await resp.json()
            assert resp.status == 200 and health["teacher"] == "reference"
            assert health["latency_ms"] == settings.reference_teacher_latency_ms
        body = {"model": "reference/nlupp", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{base}/chat/completions", json=body) as resp:
            err = (await resp.json())["error"]
            assert resp.status == 400 and "streaming is not supported" in err["message"] and err["param"] == "stream"
        async with http.post(f"{base}/chat/completions", data=b"{nope") as resp:
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        parts = {
            "model": "reference/banking77",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "I am still waiting on my card?"}]}],
        }
        async with http.post(f"{base}/chat/completions", json=parts, headers=QUIET) as resp:
            assert resp.status == 200 and resp.headers["X-Reference-Match"] == "exact"
            assert json.loads((await resp.json())["choices"][0]["message"]["content"])["intent"] == "card_arrival"


def test_component_endpoints_and_readiness(teacher, settings: Settings) -> None:
    assert teacher.ready()
    assert teacher.endpoints() == {"teacher": settings.teacher_url}
