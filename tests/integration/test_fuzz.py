"""Fuzzing the topics the services consume: random, truncated and type-confused records on flywheel.requests,
control, interactions, datasets, models and retrain, with good records among them. Every bad record lands in
its topic's dead-letter topic with a reason, the services stay up, and the good records are served and logged
exactly once."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import yaml
from confluent_kafka import Producer

from services.client import FlywheelClient
from services.core import topics
from services.core.clickhouse import client as ch_client
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import confluent_config, read_to_end
from services.core.records import (
    RECORD_TYPES,
    AgentControl,
    ChatMessage,
    DeadLetter,
    InferenceRequest,
    InferenceResponse,
    ModelEvent,
    RetrainTriggered,
)
from services.core.settings import Settings
from services.core.topics import TopicSpec
from tests.unit.test_logger_rows import interaction

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
AGENT = f"fuzzed-{RUN}"
FUZZED = (topics.REQUESTS, topics.CONTROL, topics.INTERACTIONS, topics.DATASETS, topics.MODELS, topics.RETRAIN)
PER_TOPIC = 400  # 2,400 bad records in all
CODEC = AvroCodec()


def samples() -> list[bytes]:
    """One valid encoding of each record type, to cut short or send to the wrong topic."""
    return [
        CODEC.encode(
            InferenceRequest(conversation_id="c", agent_id="a", messages=[ChatMessage(role="user", content="x")])
        ),
        CODEC.encode(InferenceResponse(request_id="r", conversation_id="c", agent_id="a", error="e")),
        CODEC.encode(interaction("a", 1)),
        CODEC.encode(AgentControl(agent_id="a", mode="teacher")),
        CODEC.encode(ModelEvent(agent_id="a", kind="rejected", model_name="m")),
        CODEC.encode(RetrainTriggered(agent_id="a", reason="manual", evidence="{}")),
        CODEC.encode(DeadLetter(source_topic="t", partition=0, offset=0, error_kind="k", error="e", service="s")),
    ]


def bad_records(spec: TopicSpec, rng: random.Random, n: int) -> Iterator[bytes]:
    """Random bytes, truncated records, records of another type, a right header with a wrong body, empties."""
    valid = samples()
    header = CODEC.latest[spec.record].fingerprint if spec.record else b""
    for i in range(n):
        shape = i % 5
        if shape == 0:
            yield rng.randbytes(rng.randint(1, 300))
        elif shape == 1:
            whole = rng.choice(valid)
            yield whole[: rng.randint(1, len(whole) - 1)]
        elif shape == 2:
            yield rng.choice(valid)  # of another type (kept only if it does not decode as this topic's type)
        elif shape == 3:
            yield b"\xc3\x01" + header + rng.randbytes(rng.randint(0, 60))
        else:
            yield b""


def is_bad(spec: TopicSpec, value: bytes) -> bool:
    try:
        CODEC.decode(value, RECORD_TYPES[spec.record])  # type: ignore[index]
    except DecodeError:
        return True
    return False


@pytest.fixture(scope="module")
def fuzzed_stack(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory):
    from tests.conftest import start_services

    agents_file = tmp_path_factory.mktemp("agents") / "agents.yaml"
    agents = {AGENT: {"mode": "teacher", "teacher": {"model": "reference/banking77"}}}
    agents_file.write_text(yaml.safe_dump({"agents": agents}))
    svc_settings = settings.model_copy(update={"agents_file": agents_file})
    names = ("logger", "router", "trainer")
    start_services(stack_manager, svc_settings, names)
    yield svc_settings
    for name in names:
        stack_manager.stop(name)


async def test_bad_records_are_dead_lettered_and_good_ones_served_once(fuzzed_stack: Settings, stack_manager) -> None:
    settings = fuzzed_stack
    rng = random.Random(20261207)
    producer = Producer({**confluent_config(settings), "linger.ms": 5})
    placed: dict[str, set[tuple[int, int]]] = {spec.name: set() for spec in FUZZED}
    failures: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            placed[msg.topic()].add((msg.partition(), msg.offset()))

    bad = {spec.name: [v for v in bad_records(spec, rng, PER_TOPIC) if is_bad(spec, v)] for spec in FUZZED}
    good_interactions = [interaction(f"{AGENT}-logged", i) for i in range(40)]
    good_requests = [
        InferenceRequest(
            conversation_id=uuid.uuid4().hex,
            agent_id=AGENT,
            messages=[ChatMessage(role="user", content=f"fuzz {i}: my card has not arrived")],
        )
        for i in range(40)
    ]

    async def send_bad() -> None:
        for i in range(PER_TOPIC):
            for spec in FUZZED:
                values = bad[spec.name]
                if i < len(values):
                    key = rng.choice([None, b"k", rng.randbytes(8)])
                    if spec.compacted:  # a compacted topic takes no record without a key
                        key = key or b"k"
                    producer.produce(spec.name, values[i], key=key, on_delivery=delivered)
            if i % 10 == 0:
                producer.poll(0)
                good = good_interactions[i // 10] if i // 10 < len(good_interactions) else None
                if good is not None:
                    producer.produce(topics.INTERACTIONS.name, CODEC.encode(good), key=good.request_id.encode())
                await asyncio.sleep(0.01)
        assert producer.flush(60) == 0

    async with FlywheelClient(settings) as client:
        answers = asyncio.gather(*(client.submit(r, timeout_s=180) for r in good_requests))
        await send_bad()
        responses = await answers
    assert not failures

    # The good records: every request answered without error, and each logged once, as were the interactions.
    assert [r.request_id for r in responses] == [r.request_id for r in good_requests]
    assert not [r.error for r in responses if r.error]
    ch = ch_client(settings)
    try:
        deadline = time.monotonic() + 120
        while True:
            got = dict(
                ch.query(
                    "SELECT agent_id, count() FROM interactions WHERE agent_id IN {a:Array(String)} GROUP BY agent_id",
                    parameters={"a": [AGENT, f"{AGENT}-logged"]},
                ).result_rows
            )
            if (got.get(AGENT, 0) >= 40 and got.get(f"{AGENT}-logged", 0) >= 40) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        time.sleep(3)  # a duplicate would land after the first copy
        got = dict(
            ch.query(
                "SELECT agent_id, count() FROM interactions WHERE agent_id IN {a:Array(String)} GROUP BY agent_id",
                parameters={"a": [AGENT, f"{AGENT}-logged"]},
            ).result_rows
        )
    finally:
        ch.close()
    assert got == {AGENT: 40, f"{AGENT}-logged": 40}

    # Every bad record is in its topic's dead-letter topic, with a reason.
    counts = Counter()
    for spec in FUZZED:
        letters = []
        for record in await read_to_end(settings, spec.dlq.name, 120):
            try:
                letters.append(CODEC.decode(record.value, DeadLetter))
            except DecodeError:
                continue  # another test's unreadable dead letter
        lettered = {(d.partition, d.offset) for d in letters if d.source_topic == spec.name and d.error}
        missing = placed[spec.name] - lettered
        assert not missing, f"{spec.name}: {len(missing)} of {len(placed[spec.name])} bad records not dead-lettered"
        counts[spec.name] = len(placed[spec.name])
    assert sum(counts.values()) > 1500, counts

    # The services stayed up.
    for name in ("logger", "router", "trainer"):
        assert stack_manager.running_pid(name) is not None, f"{name} died"
