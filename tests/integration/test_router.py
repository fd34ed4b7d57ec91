"""The serving path on the real local stack: the router and the logger run as processes (as `flywheel up`
starts them), the reference teacher serves over HTTP, a tiny student serves from Triton. Requests go in
through the client; responses come back and interactions land in ClickHouse, for every mode."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from services.client import FlywheelClient
from services.core import topics
from services.core.clickhouse import client as ch_client
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.model_repository import ModelRepository, StudentModelSpec, student_model_name
from services.core.records import AgentControl, ChatMessage, DeadLetter, InferenceRequest, Interaction, ModelEvent
from services.core.settings import Settings

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
AGENTS = {
    "pinned-teacher": {"mode": "teacher"},
    "in-grace": {},
    "live": {"routing": {"canary_steps": [1.0], "shadow_rate": 0.0}},
    "unsure": {"routing": {"canary_steps": [1.0], "shadow_rate": 0.0}},
    "shadowed": {"routing": {"canary_steps": [1.0], "shadow_rate": 0.3}},
    "canary": {"routing": {"canary_steps": [0.5, 1.0], "canary_step_requests": 1000, "shadow_rate": 0.0}},
    "ghost": {"routing": {"canary_steps": [1.0], "shadow_rate": 0.0}},
    "ordered": {},
    "tools": {"routing": {"canary_steps": [1.0], "shadow_rate": 0.0}},
}


def aid(name: str) -> str:
    return f"{name}-{RUN}"


@pytest.fixture(scope="module")
def serving(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory):
    """Router and logger processes over the session's stack, with this module's agents."""
    from tests.conftest import start_services

    agents_file = tmp_path_factory.mktemp("agents") / "agents.yaml"
    agents = {aid(name): {"teacher": {"model": "reference/banking77"}, **cfg} for name, cfg in AGENTS.items()}
    agents_file.write_text(yaml.safe_dump({"agents": agents}))
    svc_settings = settings.model_copy(update={"agents_file": agents_file})
    start_services(stack_manager, svc_settings)
    return svc_settings


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    from tests.helpers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-student"))


async def promote(settings: Settings, agent_id: str, base: Path, threshold: float) -> int:
    """Publish a tiny student for the agent in Triton and announce it on flywheel.models."""
    repo = ModelRepository.from_settings(settings)
    published = await asyncio.to_thread(
        repo.publish_student, agent_id, StudentModelSpec(base_model=str(base), max_new_tokens=8)
    )
    event = ModelEvent(
        agent_id=agent_id,
        kind="promoted",
        model_name=student_model_name(agent_id),
        model_version=published.version,
        confidence_threshold=threshold,
        metrics={"agreement": 0.95},
    )
    await publish(settings, topics.MODELS, event, agent_id)
    return published.version


async def publish(settings: Settings, topic, record, key: str) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        await Publisher(producer, AvroCodec()).send(topic, record, key)
    finally:
        await producer.stop()


def request(agent: str, text: str = "I am still waiting on my card?", conversation: str | None = None):
    return InferenceRequest(
        conversation_id=conversation or uuid.uuid4().hex,
        agent_id=agent,
        messages=[ChatMessage(role="user", content=text)],
    )


async def send_all(settings: Settings, requests: list[InferenceRequest]):
    async with FlywheelClient(settings) as client:
        return await asyncio.gather(*(client.submit(r, timeout_s=120) for r in requests))


def rows(settings: Settings, sql: str, **params) -> list[tuple]:
    ch = ch_client(settings)
    try:
        return ch.query(sql, parameters=params).result_rows
    finally:
        ch.close()


def wait_rows(settings: Settings, agent: str, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = rows(settings, "SELECT count() FROM interactions WHERE agent_id = {a:String}", a=agent)[0][0]
        if got >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"{agent}: {got} of {n} interactions reached ClickHouse within {timeout_s}s")


async def test_teacher_mode_and_grace_period_are_served_by_the_teacher(serving: Settings) -> None:
    reqs = [request(aid("pinned-teacher")) for _ in range(5)] + [request(aid("in-grace")) for _ in range(5)]
    responses = await send_all(serving, reqs)
    assert all(r.served_by == "teacher" and r.error is None for r in responses)
    assert all('"intent"' in (r.content or "") for r in responses)
    assert all(r.cost_usd > 0 for r in responses)
    for name, reason in (("pinned-teacher", "mode_teacher"), ("in-grace", "grace_period")):
        wait_rows(serving, aid(name), 5)
        got = rows(
            serving,
            "SELECT served_by, route_reason, lifecycle_stage, teacher_ran, student_ran, training_candidate, "
            "cost_usd = teacher_only_cost_usd FROM interactions WHERE agent_id = {a:String}",
            a=aid(name),
        )
        assert set(got) == {("teacher", reason, "grace", True, False, True, True)}, got


async def test_live_student_serves_and_low_confidence_falls_back(serving: Settings, tiny_student: Path) -> None:
    await promote(serving, aid("live"), tiny_student, threshold=0.0)
    await promote(serving, aid("unsure"), tiny_student, threshold=1.0)  # never sure enough: always the teacher
    await asyncio.sleep(2)  # the router follows flywheel.models
    live = await send_all(serving, [request(aid("live")) for _ in range(8)])
    assert all(r.served_by == "student" and r.model_version and r.confidence is not None for r in live)
    unsure = await send_all(serving, [request(aid("unsure")) for _ in range(8)])
    assert all(r.served_by == "teacher" for r in unsure)
    wait_rows(serving, aid("unsure"), 8)
    got = rows(
        serving,
        "SELECT route_reason, student_ran, teacher_ran, training_candidate, cost_usd > teacher_only_cost_usd "
        "FROM interactions WHERE agent_id = {a:String}",
        a=aid("unsure"),
    )
    assert set(got) == {("low_confidence", True, True, True, True)}  # fallback pays for both models
    wait_rows(serving, aid("live"), 8)
    got = rows(
        serving,
        "SELECT served_by, route_reason, lifecycle_stage, teacher_ran FROM interactions WHERE agent_id = {a:String}",
        a=aid("live"),
    )
    assert set(got) == {("student", "confident", "live", False)}


async def test_shadow_share_within_tolerance(serving: Settings, tiny_student: Path) -> None:
    await promote(serving, aid("shadowed"), tiny_student, threshold=0.0)
    await asyncio.sleep(2)
    n = 200
    responses = await send_all(serving, [request(aid("shadowed")) for _ in range(n)])
    assert all(r.served_by == "student" for r in responses)
    wait_rows(serving, aid("shadowed"), n)
    shadows, both = rows(
        serving,
        "SELECT countIf(shadow), countIf(shadow AND teacher_ran AND student_ran) FROM interactions "
        "WHERE agent_id = {a:String}",
        a=aid("shadowed"),
    )[0]
    # 30 % of 200: 60 expected, sd 6.5; four sd either side.
    assert 34 <= shadows <= 86 and both == shadows


async def test_canary_ramp_splits_eligible_traffic(serving: Settings, tiny_student: Path) -> None:
    await promote(serving, aid("canary"), tiny_student, threshold=0.0)
    await asyncio.sleep(2)
    responses = await send_all(serving, [request(aid("canary")) for _ in range(100)])
    student = sum(r.served_by == "student" for r in responses)
    assert 25 <= student <= 75  # the first step: half of the eligible traffic
    assert {r.served_by for r in responses} == {"student", "teacher"}


async def test_control_switches_mode_at_run_time(serving: Settings, tiny_student: Path) -> None:
    agent = aid("in-grace")
    await publish(serving, topics.CONTROL, AgentControl(agent_id=agent, mode="teacher"), agent)
    await asyncio.sleep(2)
    (r,) = await send_all(serving, [request(agent)])
    assert r.served_by == "teacher"
    wait_rows(serving, agent, 6)
    assert rows(
        serving,
        "SELECT route_reason FROM interactions WHERE agent_id = {a:String} ORDER BY received_at DESC LIMIT 1",
        a=agent,
    ) == [("mode_teacher",)]


async def test_malformed_and_unknown_agent_requests_go_to_the_dlq(serving: Settings) -> None:
    codec = AvroCodec()
    dlq = create_consumer(serving, None)
    await dlq.start()
    from aiokafka import TopicPartition

    tp = TopicPartition(topics.REQUESTS.dlq.name, 0)
    dlq.assign([tp])
    await dlq.seek_to_end(tp)
    await dlq.position(tp)
    conversation = uuid.uuid4().hex
    producer = create_producer(serving)
    await producer.start()
    try:
        await producer.send_and_wait(topics.REQUESTS.name, b"\xc3\x01garbage", key=conversation.encode())
    finally:
        await producer.stop()
    unknown, good = await send_all(
        serving, [request("no-such-agent"), request(aid("in-grace"), conversation=conversation)]
    )
    assert unknown.error and "no-such-agent" in unknown.error and unknown.served_by == "none"
    assert good.error is None and good.served_by == "teacher"  # the next request of that conversation is served
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + 20
    try:
        while len(letters) < 2 and time.monotonic() < deadline:
            for msgs in (await dlq.getmany(timeout_ms=500)).values():
                letters += [codec.decode(m.value, DeadLetter) for m in msgs]
    finally:
        await dlq.stop()
    kinds = {letter.error_kind: letter for letter in letters}
    assert "unknown_agent" in kinds and "no-such-agent" in kinds["unknown_agent"].error
    assert kinds.keys() & {"truncated", "bad_body", "unknown_fingerprint"}
    assert any(letter.value == b"\xc3\x01garbage" for letter in letters)


async def test_malformed_tools_get_an_error_response_at_once_whoever_would_serve(
    serving: Settings, tiny_student: Path
) -> None:
    await promote(serving, aid("tools"), tiny_student, threshold=0.0)
    await asyncio.sleep(2)  # the router follows flywheel.models
    bad = [request(aid(name)).model_copy(update={"tools": "{not json"}) for name in ("tools", "in-grace")]
    t0 = time.monotonic()
    live, grace = await send_all(serving, bad)
    assert time.monotonic() - t0 < 5
    for answer in (live, grace):
        assert answer.served_by == "none" and "tools are not usable" in (answer.error or ""), answer.error


async def test_a_missing_student_model_falls_back_to_the_teacher(serving: Settings) -> None:
    """A promotion whose model Triton does not have: a counted student error, answered by the teacher."""
    agent = aid("ghost")
    event = ModelEvent(agent_id=agent, kind="promoted", model_name=student_model_name(agent), model_version=7)
    await publish(serving, topics.MODELS, event, agent)
    await asyncio.sleep(2)
    responses = await send_all(serving, [request(agent) for _ in range(3)])
    assert all(r.served_by == "teacher" and r.error is None for r in responses)
    wait_rows(serving, agent, 3)
    got = rows(
        serving,
        "SELECT route_reason, student_ran, student_error LIKE '%student_ghost%', training_candidate "
        "FROM interactions WHERE agent_id = {a:String}",
        a=agent,
    )
    assert set(got) == {("student_error", True, True, True)}


async def test_one_conversation_is_served_in_order_while_others_run_concurrently(serving: Settings) -> None:
    agent = aid("ordered")
    conversation = uuid.uuid4().hex
    ordered = [
        request(agent, text=f"message {i}: my card has not arrived", conversation=conversation) for i in range(15)
    ]
    others = [request(agent) for _ in range(30)]
    async with FlywheelClient(serving) as client:
        await asyncio.gather(*(client.submit(r, timeout_s=120) for r in ordered + others))
    wait_rows(serving, agent, 45)
    got = rows(
        serving,
        "SELECT request_id FROM interactions WHERE conversation_id = {c:String} ORDER BY responded_at",
        c=conversation,
    )
    assert [r[0] for r in got] == [r.request_id for r in ordered]
    # Concurrency across conversations: the 45 requests took far less than 45 teacher round trips in a row.
    spans = rows(
        serving,
        "SELECT max(responded_at) - min(received_at), sum(teacher_latency_ms) / 1000 FROM interactions "
        "WHERE agent_id = {a:String}",
        a=agent,
    )[0]
    assert float(spans[0]) < float(spans[1])


async def test_two_routers_and_rebalances_mid_traffic_answer_every_request_once(
    serving: Settings, stack_manager, tmp_path: Path
) -> None:
    """A second router joins the group while requests flow, then the first leaves: every request is answered,
    and served (one interaction) exactly once."""
    from services.core.kafka import read_to_end
    from services.stack.process import ProcessManager
    from services.stack.services import ServiceProcess
    from tests.conftest import start_services

    agent = aid("pinned-teacher")
    second = serving.model_copy(update={"home": tmp_path / "second"})  # its own run and log directories
    second_manager = ProcessManager(second.run_dir, second.log_dir)
    sent: list[InferenceRequest] = []
    pending: list[asyncio.Future] = []

    async def traffic(client: FlywheelClient, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            req = request(agent, text=f"rebalance {len(sent)}: my card has not arrived")
            sent.append(req)
            pending.append(asyncio.ensure_future(client.submit(req, timeout_s=180)))
            await asyncio.sleep(0.05)

    try:
        async with FlywheelClient(serving) as client:
            await traffic(client, 2)
            joining = asyncio.ensure_future(
                asyncio.to_thread(
                    second_manager.start,
                    ServiceProcess.for_service(second, "router"),
                    second.stack_start_timeout_s,
                )
            )
            while not joining.done():
                await traffic(client, 0.5)
            await joining
            await traffic(client, 6)  # both routers serve; the group has rebalanced
            leaving = asyncio.ensure_future(asyncio.to_thread(stack_manager.stop, "router"))
            while not leaving.done():
                await traffic(client, 0.5)
            await traffic(client, 6)  # the second router has taken every partition
            responses = await asyncio.gather(*pending)
    finally:
        second_manager.stop("router")
        start_services(stack_manager, serving, ("router",))

    assert len(sent) > 100
    assert [r.request_id for r in responses] == [r.request_id for r in sent]
    assert not [r.error for r in responses if r.error]
    ids = {r.request_id for r in sent}
    served = Counter()
    codec = AvroCodec()
    for record in await read_to_end(serving, topics.INTERACTIONS.name):
        try:
            interaction = codec.decode(record.value, Interaction)
        except DecodeError:
            continue  # the fuzz test's garbage, and records of other types
        if interaction.request_id in ids:
            served[interaction.request_id] += 1
    assert len(served) == len(ids), f"{len(ids) - len(served)} requests were never served"
    assert not [rid for rid, n in served.items() if n != 1], "requests served more than once"
    # Both routers served some of them.
    logs = second.log_dir / "router.log"
    assert "serving partitions" in logs.read_text()
