"""The router in process: a shadow sample's teacher call happens after the response is ready, and the student is
billed on the token counts it reports."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone

from services.core.agents import load_agents
from services.core.records import ChatMessage, InferenceRequest, ModelEvent
from services.core.settings import REPO_ROOT, Settings
from services.core.student import StudentAnswer, StudentClient
from services.router.service import Router
from services.teacher.reference import ReferenceTeacher

ANSWER = '{"intent": "card_arrival", "tool": "card_delivery_status", "arguments": {}, "reply": "On its way."}'


class CountingStudent(StudentClient):
    """A student that answers at once, confidently, with the token counts Triton would report."""

    async def answer(self, agent_id, messages, tools=None, version=None) -> StudentAnswer:  # type: ignore[override]
        return StudentAnswer(
            text=ANSWER,
            confidence=0.99,
            model=f"student_{agent_id}",
            model_version="1",
            latency_ms=5.0,
            input_tokens=40,
            output_tokens=12,
            forward_passes=2,
        )


class GatedTeacher(ReferenceTeacher):
    """The reference teacher, answering only once the test opens the gate."""

    gate: asyncio.Event

    async def complete(self, *args, **kwargs):  # type: ignore[override]
        await self.gate.wait()
        return await super().complete(*args, **kwargs)


def test_a_shadow_sample_answers_before_the_teacher_and_records_both_after() -> None:
    agents = load_agents(REPO_ROOT / "agents.yaml")
    bot = agents.agent("support-bot")
    bot = bot.model_copy(update={"routing": bot.routing.model_copy(update={"shadow_rate": 1.0, "canary_steps": [1.0]})})
    agents = agents.model_copy(update={"agents": {**agents.agents, "support-bot": bot}})
    teacher = GatedTeacher.from_data_dir(REPO_ROOT / "data", flaw_rate=0.0, latency_ms=0.0)
    router = Router(Settings(), agents, {"": teacher}, CountingStudent("127.0.0.1:1"), rng=random.Random(0))
    router.state.apply_lifecycle(
        ModelEvent(agent_id="support-bot", kind="promoted", model_name="student_support-bot", model_version=1)
    )
    request = InferenceRequest(
        conversation_id="c",
        agent_id="support-bot",
        messages=[ChatMessage(role="user", content="When will my card arrive?")],
    )

    async def scenario() -> None:
        teacher.gate = asyncio.Event()
        out = await asyncio.wait_for(router.serve(request, datetime.now(timezone.utc)), timeout=5)
        # The response is ready while the teacher has not answered.
        assert out.response.served_by == "student" and out.interaction is None and out.pending is not None
        prices = agents.tier(bot)
        assert out.response.cost_usd == prices.student.cost(40, 12)  # billed on what the student reported
        teacher.gate.set()
        interaction = await asyncio.wait_for(out.settled(), timeout=5)
        assert interaction.shadow and interaction.route_reason == "confident"
        assert interaction.teacher is not None and interaction.teacher.error is None
        assert interaction.student is not None and interaction.student.input_tokens == 40
        assert interaction.cost_usd > out.response.cost_usd  # the shadow's teacher cost is in the interaction
        assert interaction.teacher_only_cost_usd == prices.teacher.cost(
            interaction.teacher.input_tokens, interaction.teacher.output_tokens
        )

    asyncio.run(scenario())


class BrokenPublisher:
    """A broker that takes nothing: every send fails."""

    async def send(self, *args, **kwargs) -> None:
        raise ConnectionError("broker down")

    async def send_nowait(self, *args, **kwargs) -> None:
        raise ConnectionError("broker down")


def test_a_request_neither_answered_nor_dead_lettered_keeps_its_offset_and_stops_the_router() -> None:
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    agents = load_agents(REPO_ROOT / "agents.yaml")
    teacher = ReferenceTeacher.from_data_dir(REPO_ROOT / "data", flaw_rate=0.0, latency_ms=0.0)
    router = Router(Settings(), agents, {"": teacher}, CountingStudent("127.0.0.1:1"), rng=random.Random(0))
    router.publisher = BrokenPublisher()  # type: ignore[assignment]
    msg = ConsumerRecord("flywheel.requests", 0, 7, 0, 0, b"k", b"\x00garbage", None, 1, 9, [])

    async def scenario() -> None:
        router._tracker.started(TopicPartition(msg.topic, msg.partition), msg.offset)
        await router._slots.acquire()
        await router._handle(msg, None)

    asyncio.run(scenario())
    assert router._stop.is_set() and router._fatal is not None  # stops, to serve it again after a restart
    assert router._tracker.committable() == {TopicPartition("flywheel.requests", 0): 7}  # not past it
    assert router.stats["unacknowledged"] == 1
