"""A smoke round trip through every part of a running stack: an Avro record through Kafka, a query through
the ClickHouse endpoint, an inference through Triton, and a request through the router (answered by the
teacher or the student) whose interaction the logger writes to ClickHouse. Works the same against the
production stack."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from services.core.codec import AvroCodec
from services.core.records import ChatMessage, InferenceRequest
from services.core.settings import Settings
from services.core.topics import TopicSpec, ensure_topics

SMOKE_TOPIC = TopicSpec("flywheel.smoke", "inference_request", 1, "conversation_id", doc="smoke round trips")


class SmokeError(RuntimeError):
    pass


@dataclass
class SmokeResult:
    part: str
    ok: bool
    detail: str
    ms: float


async def kafka_round_trip(settings: Settings, codec: AvroCodec) -> str:
    from aiokafka import TopicPartition

    from services.core.kafka import Publisher, create_consumer, create_producer

    ensure_topics(settings, extra=[SMOKE_TOPIC])
    request = InferenceRequest(
        conversation_id=f"smoke-{uuid.uuid4().hex[:8]}",
        agent_id="smoke",
        messages=[ChatMessage(role="user", content="ping")],
    )
    producer = create_producer(settings)
    await producer.start()
    consumer = create_consumer(settings, None)  # no group: reads by assignment, commits nothing
    await consumer.start()
    try:
        tp = TopicPartition(SMOKE_TOPIC.name, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        start = await consumer.position(tp)
        await Publisher(producer, codec).send(SMOKE_TOPIC, request, key=request.conversation_id)
        consumer.seek(tp, start)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for msgs in (await consumer.getmany(tp, timeout_ms=500)).values():
                for msg in msgs:
                    got = codec.decode(msg.value, InferenceRequest)
                    if got.request_id == request.request_id:
                        if got != request:
                            raise SmokeError("kafka: the record came back different")
                        return f"{SMOKE_TOPIC.name}: Avro record produced and consumed back"
        raise SmokeError(f"kafka: the record did not come back from {SMOKE_TOPIC.name} within 15 s")
    finally:
        await consumer.stop()
        await producer.stop()


def clickhouse_round_trip(settings: Settings) -> str:
    from services.core.clickhouse import client

    ch = client(settings)
    version = ch.command("SELECT version()")
    applied = ch.command("SELECT count() FROM schema_migrations")
    tables = ch.query(
        "SELECT count() FROM system.tables WHERE database = {db:String}",
        parameters={"db": settings.clickhouse_database},
    ).result_rows[0][0]
    return f"ClickHouse {version}: {applied} migrations applied, {tables} tables in {settings.clickhouse_database}"


def triton_round_trip(settings: Settings) -> str:
    from services.core.model_repository import ensure_echo_model, infer_text

    name = ensure_echo_model(settings)
    text, confidence = infer_text(settings, name, '[{"role":"user","content":"ping"}]')
    if "ping" not in text:
        raise SmokeError(f"triton: {name} answered {text!r}, expected an echo of the prompt")
    return f"{name} answered over gRPC (confidence {confidence:.2f})"


async def serving_round_trip(settings: Settings) -> str:
    """One request through the router (teacher or student, by the agent's stage) and its interaction row."""
    from services.client import FlywheelClient
    from services.core.agents import load_agents
    from services.core.clickhouse import client

    agent_id = next(iter(load_agents(settings.agents_file).agents))
    request = InferenceRequest(
        conversation_id=f"smoke-{uuid.uuid4().hex[:8]}",
        agent_id=agent_id,
        messages=[ChatMessage(role="user", content="I am still waiting on my card?")],
        metadata={"source": "smoke"},
    )
    async with FlywheelClient(settings) as fc:
        response = await fc.submit(request, timeout_s=60)
    if response.error:
        raise SmokeError(f"router: {agent_id} answered with an error: {response.error}")
    ch = client(settings)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = ch.query(
                "SELECT route_reason FROM interactions WHERE request_id = {r:String}",
                parameters={"r": request.request_id},
            ).result_rows
            if found:
                return (
                    f"{agent_id} answered by the {response.served_by} ({found[0][0]}) in {response.latency_ms:.0f} ms; "
                    "its interaction is in ClickHouse"
                )
            await asyncio.sleep(0.2)
    finally:
        ch.close()
    raise SmokeError("logger: the interaction did not reach ClickHouse within 20 s")


def run_smoke(settings: Settings, report: Callable[[SmokeResult], None] = lambda r: None) -> list[SmokeResult]:
    codec = AvroCodec()
    steps: list[tuple[str, Callable[[], str]]] = [
        ("kafka", lambda: asyncio.run(kafka_round_trip(settings, codec))),
        ("clickhouse", lambda: clickhouse_round_trip(settings)),
        ("triton", lambda: triton_round_trip(settings)),
        ("serving", lambda: asyncio.run(serving_round_trip(settings))),
    ]
    results = []
    for part, step in steps:
        t0 = time.perf_counter()
        try:
            detail, ok = step(), True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        result = SmokeResult(part, ok, detail, (time.perf_counter() - t0) * 1000)
        report(result)
        results.append(result)
    return results
