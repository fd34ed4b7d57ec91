"""The local broker (Tansu) with every Kafka client the project uses: Avro records round-trip through
aiokafka and confluent-kafka, a faust-streaming agent consumes one topic and produces another, and each
kind of bad payload lands on the dead-letter topic with its reason while the next record is still read."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from services.core.codec import AvroCodec
from services.core.kafka import (
    Publisher,
    TopicReader,
    confluent_config,
    confluent_consumer_config,
    create_consumer,
    create_producer,
)
from services.core.records import ChatMessage, DeadLetter, InferenceRequest
from services.core.settings import Settings
from services.core.topics import TopicSpec, all_topics, ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def _request(i: int = 0) -> InferenceRequest:
    return InferenceRequest(
        conversation_id=f"c{i}",
        agent_id="support-bot",
        messages=[ChatMessage(role="user", content=f"msg {i}")],
    )


def _fresh_topic(settings: Settings, partitions: int = 2) -> TopicSpec:
    spec = TopicSpec(f"test.{uuid.uuid4().hex[:8]}", "inference_request", partitions, "conversation_id")
    ensure_topics(settings, extra=[spec, spec.dlq])
    return spec


def test_catalogue_created_with_explicit_partitions(broker, settings: Settings) -> None:
    topics = AdminClient(confluent_config(settings)).list_topics(timeout=10).topics
    for spec in all_topics():
        assert spec.name in topics, spec.name
        assert len(topics[spec.name].partitions) == spec.partitions, spec.name
    assert ensure_topics(settings) == []  # a second run creates nothing


async def test_avro_round_trip_aiokafka(broker, settings: Settings, codec: AvroCodec) -> None:
    topic = _fresh_topic(settings)
    sent = [_request(i) for i in range(20)]
    producer = create_producer(settings)
    await producer.start()
    try:
        publisher = Publisher(producer, codec)
        for r in sent:
            await publisher.send(topic, r, key=r.conversation_id)
        consumer = create_consumer(settings, f"g-{uuid.uuid4().hex[:6]}", topic.name)
        await consumer.start()
        try:
            reader: TopicReader[InferenceRequest] = TopicReader(consumer, publisher, topic, "test")
            got: list[InferenceRequest] = []
            deadline = time.monotonic() + 30
            while len(got) < len(sent) and time.monotonic() < deadline:
                batch = await reader.read_batch(timeout_ms=500)
                got.extend(d.record for d in batch.records)
                await reader.commit(batch)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    assert sorted(got, key=lambda r: r.request_id) == sorted(sent, key=lambda r: r.request_id)


def test_avro_round_trip_confluent(broker, settings: Settings, codec: AvroCodec) -> None:
    topic = _fresh_topic(settings)
    sent = [_request(i) for i in range(20)]
    producer = Producer(confluent_config(settings))
    for r in sent:
        producer.produce(topic.name, codec.encode(r), key=r.conversation_id.encode())
    assert producer.flush(15) == 0
    consumer = Consumer(confluent_consumer_config(settings, f"g-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe([topic.name])
    got = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            got.append(codec.decode(msg.value(), InferenceRequest))
            consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()
    assert {r.request_id for r in got} == {r.request_id for r in sent}
    assert next(r for r in got if r.request_id == sent[3].request_id) == sent[3]


async def test_bad_payloads_land_in_dlq_and_the_next_record_is_served(
    broker, settings: Settings, codec: AvroCodec
) -> None:
    topic = _fresh_topic(settings, partitions=1)
    good = codec.encode(_request(1))
    unknown_fp = good[:2] + b"\x00" * 8 + good[10:]
    bad = {
        "unknown_fingerprint": unknown_fp,
        "truncated": good[:-6],
        # request_id "r", conversation "c", agent "a", one message whose role is enum symbol 9 of 4
        "bad_body": good[:10] + b"\x02r\x02c\x02a\x02\x12",
        "not_single_object": b'{"agent_id": "support-bot"}',
        "wrong_record": codec.encode(
            DeadLetter(source_topic="x", partition=0, offset=0, error_kind="k", error="e", service="s")
        ),
    }
    producer = create_producer(settings)
    await producer.start()
    try:
        for i, payload in enumerate(bad.values()):
            await producer.send_and_wait(topic.name, payload, key=f"k{i}".encode())
        await producer.send_and_wait(topic.name, good, key=b"good")
        publisher = Publisher(producer, codec)
        group = f"g-{uuid.uuid4().hex[:6]}"
        consumer = create_consumer(settings, group, topic.name)
        await consumer.start()
        records = []
        dead = 0
        try:
            reader: TopicReader[InferenceRequest] = TopicReader(consumer, publisher, topic, "test")
            deadline = time.monotonic() + 30
            while (not records or dead < len(bad)) and time.monotonic() < deadline:
                batch = await reader.read_batch(timeout_ms=500)
                records += batch.records
                dead += batch.dead_letters
                await reader.commit(batch)
        finally:
            await consumer.stop()
        assert [r.record.request_id for r in records] == [_request(1).request_id] or len(records) == 1
        assert dead == len(bad)

        dlq = create_consumer(settings, f"g-{uuid.uuid4().hex[:6]}", topic.dlq.name)
        await dlq.start()
        letters: list[DeadLetter] = []
        try:
            deadline = time.monotonic() + 30
            while len(letters) < len(bad) and time.monotonic() < deadline:
                for msgs in (await dlq.getmany(timeout_ms=500)).values():
                    letters += [codec.decode(m.value, DeadLetter) for m in msgs]
        finally:
            await dlq.stop()
    finally:
        await producer.stop()
    by_kind = {letter.error_kind: letter for letter in letters}
    assert set(by_kind) == set(bad)
    for kind, payload in bad.items():
        assert by_kind[kind].value == payload  # the raw bytes, untouched
        assert by_kind[kind].source_topic == topic.name
        assert by_kind[kind].error
    # Committed past the bad records: a restarted reader starts after them.
    consumer = create_consumer(settings, group, topic.name)
    await consumer.start()
    try:
        again = await consumer.getmany(timeout_ms=1500)
    finally:
        await consumer.stop()
    assert not any(again.values())


def test_faust_agent_consumes_one_topic_and_produces_another(broker, settings: Settings, codec: AvroCodec) -> None:
    """A faust-streaming worker with a table: its changelog topic is created up front with the source's
    partition count (otherwise faust fails with PartitionsMismatch on this broker)."""
    import faust

    from services.core.topics import changelog_topic

    source = _fresh_topic(settings, partitions=2)
    sink = TopicSpec(source.name + ".out", None, 2, "conversation_id")
    app_id = f"faust-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings, extra=[sink, changelog_topic(app_id, "counts", source)])

    async def scenario() -> list[bytes]:
        app = faust.App(
            app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            web_enabled=False,
            topic_partitions=2,
            topic_allow_declare=False,
            producer_acks=-1,
        )
        src = app.topic(source.name, value_serializer="raw", key_serializer="raw", partitions=2)
        dst = app.topic(sink.name, value_serializer="raw", key_serializer="raw", partitions=2)
        counts = app.Table("counts", default=int, partitions=2)

        @app.agent(src)
        async def relay(stream):
            async for key, value in stream.items():
                request = codec.decode(value, InferenceRequest)
                counts[request.agent_id] += 1
                await dst.send(key=key, value=value.upper() if False else codec.encode(request))

        producer = create_producer(settings)
        await producer.start()
        publisher = Publisher(producer, codec)
        for i in range(5):
            await publisher.send(source, _request(i), key=f"c{i}")
        await producer.stop()

        worker_task = asyncio.ensure_future(app.start())
        out = create_consumer(settings, f"g-{uuid.uuid4().hex[:6]}", sink.name)
        await out.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + 60
            while len(got) < 5 and time.monotonic() < deadline:
                for msgs in (await out.getmany(timeout_ms=500)).values():
                    got += [m.value for m in msgs]
        finally:
            await out.stop()
            await app.stop()
            worker_task.cancel()
        return got

    got = asyncio.run(scenario())
    assert len(got) == 5
    assert {codec.decode(v, InferenceRequest).conversation_id for v in got} == {f"c{i}" for i in range(5)}
