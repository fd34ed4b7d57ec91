"""The one Kafka helper: client configuration from settings (security included), typed publishing, and a
reader that decodes records, sends what cannot be decoded to the topic's dead-letter topic, and commits
offsets only when the caller says the work is durable."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from services.core.codec import AvroCodec, DecodeError
from services.core.records import RECORD_TYPES, DeadLetter, Record
from services.core.settings import Settings
from services.core.topics import TopicSpec

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


def confluent_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings for confluent-kafka clients (admin, benchmarks, other-language parity)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": settings.kafka_client_id,
        "security.protocol": settings.kafka_security_protocol.lower(),
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    if settings.kafka_ssl_cafile:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
    return conf


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
    conf: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl_mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl_plain_username"] = settings.kafka_sasl_username
        conf["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        conf["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    return conf


def create_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    # acks=all: a record the producer saw acknowledged survives a broker failover (with min.insync.replicas).
    # Idempotence is a setting: the local broker (Tansu) answers InitProducerId with an error.
    kwargs = {
        **aiokafka_config(settings),
        "acks": "all",
        "linger_ms": 2,
        "enable_idempotence": settings.kafka_idempotent_producer,
        **overrides,
    }
    return AIOKafkaProducer(**kwargs)


def create_consumer(
    settings: Settings,
    group_id: str | None,
    *topics: str,
    listener: ConsumerRebalanceListener | None = None,
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer that commits by hand; `listener` hears of partitions assigned and revoked (group members)."""
    # Offsets are committed by hand after the work is durable; a new group starts at the earliest record.
    kwargs = {
        **aiokafka_config(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        **overrides,
    }
    if listener is None:
        return AIOKafkaConsumer(*topics, **kwargs)
    consumer = AIOKafkaConsumer(**kwargs)
    consumer.subscribe(list(topics), listener=listener)
    return consumer


# Consumers of the lifecycle topics (models, retrain, datasets, control) wait longer per fetch than the serving
# path: their records are rare and half a second late is nothing, while a 10 ms fetch loop on every idle
# follower keeps a 2-core machine busy (the local broker answers each fetch only when its wait ends).
FOLLOWER_FETCH_WAIT_MS = 500


def create_follower(settings: Settings, group_id: str | None, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer for the lifecycle topics: as ``create_consumer``, with a longer fetch wait."""
    wait = max(settings.kafka_fetch_max_wait_ms, FOLLOWER_FETCH_WAIT_MS)
    return create_consumer(settings, group_id, *topics, **{"fetch_max_wait_ms": wait, **overrides})


async def read_to_end(settings: Settings, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of ``topic`` from its beginning to its end at the call (no group: nothing is committed).
    Raises TimeoutError naming the topic when the end is not reached in ``timeout_s``."""
    import asyncio
    import time

    consumer = create_follower(settings, None)
    await consumer.start()
    try:
        await consumer.topics()  # the cluster's metadata, for the partitions below
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: the end of the topic was not reached in {timeout_s:.0f} s")
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(messages)
            await asyncio.sleep(0)
        return records
    finally:
        await consumer.stop()


def confluent_consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka consumer settings: manual commits, earliest offset for a new group, the fetch wait."""
    return {
        **confluent_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": settings.kafka_fetch_max_wait_ms,
        **overrides,
    }


class Publisher:
    """Encodes typed records and produces them to catalogue topics, refusing the wrong record type."""

    def __init__(self, producer: AIOKafkaProducer, codec: AvroCodec) -> None:
        self.producer = producer
        self.codec = codec

    async def send(self, topic: TopicSpec | str, record: Record, key: str | bytes | None) -> None:
        """Produce and wait for the broker's acknowledgement."""
        fut = await self.send_nowait(topic, record, key)
        await fut

    async def send_nowait(self, topic: TopicSpec | str, record: Record, key: str | bytes | None) -> Any:
        """Produce; returns the delivery future (batches many records per round trip). A topic given by name
        (a client's own reply topic, outside the catalogue) has no record type to check."""
        if isinstance(topic, TopicSpec):
            if topic.record is not None and record.SCHEMA != topic.record:
                raise TypeError(f"{topic.name} carries {topic.record} records, not {record.SCHEMA}")
            topic = topic.name
        raw_key = key.encode() if isinstance(key, str) else key
        return await self.producer.send(topic, self.codec.encode(record), key=raw_key)


@dataclass(frozen=True)
class Delivered(Generic[R]):
    record: R
    topic: str
    partition: int
    offset: int
    key: bytes | None


@dataclass
class Batch(Generic[R]):
    records: list[Delivered[R]] = field(default_factory=list)
    dead_letters: int = 0
    # Next offset to commit per partition, covering good and dead-lettered records alike.
    positions: dict[TopicPartition, int] = field(default_factory=dict)


def dead_letter_for(msg: ConsumerRecord, kind: str, reason: str, service: str) -> DeadLetter:
    return DeadLetter(
        source_topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        error_kind=kind,
        error=reason,
        service=service,
    )


class TopicReader(Generic[R]):
    """Reads one catalogue topic as typed records. Undecodable records go to ``<topic>.dlq`` (acknowledged
    before the batch is returned, so committing the batch never loses them)."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        publisher: Publisher,
        topic: TopicSpec,
        service: str,
    ) -> None:
        if topic.record is None:
            raise ValueError(f"{topic.name} has no record type to decode")
        self.consumer = consumer
        self.publisher = publisher
        self.topic = topic
        self.service = service
        self.record_type = RECORD_TYPES[topic.record]

    async def read_batch(self, timeout_ms: int = 500, max_records: int | None = None) -> Batch[R]:
        got = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        batch: Batch[R] = Batch()
        pending = []
        for tp, messages in got.items():
            for msg in messages:
                try:
                    record = self.publisher.codec.decode(msg.value, self.record_type)
                except DecodeError as err:
                    log.warning(
                        "%s: %s[%d]@%d to %s: %s",
                        self.service,
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        self.topic.dlq.name,
                        err,
                    )
                    letter = dead_letter_for(msg, err.kind, err.reason, self.service)
                    pending.append(await self.publisher.send_nowait(self.topic.dlq, letter, msg.key))
                    batch.dead_letters += 1
                else:
                    batch.records.append(Delivered(record, msg.topic, msg.partition, msg.offset, msg.key))  # type: ignore[arg-type]
                batch.positions[tp] = msg.offset + 1
        for fut in pending:
            await fut
        return batch

    async def commit(self, batches: Iterable[Batch[R]] | Batch[R]) -> None:
        """Commit the positions of work that is now durable."""
        items = [batches] if isinstance(batches, Batch) else list(batches)
        offsets: dict[TopicPartition, int] = {}
        for b in items:
            for tp, pos in b.positions.items():
                offsets[tp] = max(pos, offsets.get(tp, 0))
        if offsets:
            await self.consumer.commit(offsets)
