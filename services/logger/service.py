"""The logger: ``flywheel.interactions`` → ClickHouse ``interactions``, and the lifecycle topics
(``flywheel.models``, ``flywheel.datasets``, ``flywheel.retrain``) → ``model_events``, ``datasets``,
``retrain_events``, the durable record that starting services rebuild their state from.

At least once, never twice: offsets are committed only after the batch is in ClickHouse (and its dead
letters are acknowledged), and the sink leaves out records already stored, so a replay after a crash or a
rebalance writes nothing twice. Batches are written when they are full or old enough (``batching``), one
write in flight while the next batch is read.

Interactions take a fast path: a record in the latest schema version is passed on as its Avro body, never
decoded here (ClickHouse decodes it, see ``sink``). Anything else on the topic is decoded by the codec: an
older schema version is re-encoded in the latest one; what does not decode goes to ``flywheel.interactions.dlq``
(the same dead letters as ``TopicReader``'s) and is committed past. The lifecycle topics use ``TopicReader``.

Run: ``python -m services.logger`` (settings from ``FLYWHEEL_*``, batching from ``FLYWHEEL_LOGGER_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core import topics
from services.core.codec import HEADER_LEN, MAGIC, AvroCodec, DecodeError
from services.core.health import clear_ready, mark_ready
from services.core.kafka import (
    Batch,
    Delivered,
    Publisher,
    TopicReader,
    create_consumer,
    create_producer,
    dead_letter_for,
)
from services.core.records import DeadLetter, Interaction, Record
from services.core.settings import Settings, SettingsError
from services.core.topics import TopicSpec
from services.logger.batching import Batcher, BatchPolicy
from services.logger.rows import DATASETS, MODEL_EVENTS, RETRAIN_EVENTS, TableSpec
from services.logger.sink import InteractionSink, LifecycleSink, RetryPolicy, SinkStopped, WriteResult

log = logging.getLogger("flywheel.logger")
SERVICE = "logger"
POLL_S = 0.5  # the longest a read waits, so a stop request is noticed within it
T = TypeVar("T")

# One interactions entry: the Kafka record, and the Avro body to write (None when it was dead-lettered).
Entry = tuple[ConsumerRecord, "bytes | memoryview | None"]
LIFECYCLE: tuple[tuple[TopicSpec, TableSpec], ...] = (
    (topics.MODELS, MODEL_EVENTS),
    (topics.DATASETS, DATASETS),
    (topics.RETRAIN, RETRAIN_EVENTS),
)


class LoggerConfig(BaseSettings):
    """The logger's own knobs (``FLYWHEEL_LOGGER_<NAME>``); the shared ones are in ``Settings``."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_LOGGER_", extra="forbid")

    group_id: str = "flywheel-logger"
    max_batch_rows: int = Field(5000, ge=1, description="write a batch once it holds this many records")
    max_batch_age_ms: float = Field(200.0, ge=0, description="... or once its oldest record waited this long")
    max_batch_bytes: int = Field(64 << 20, ge=1, description="... or once it holds this many bytes")
    lifecycle_batch_rows: int = Field(1000, ge=1)
    dedupe_window_s: float = Field(
        900.0, ge=0, description="a different record for a stored request id is skipped within this distance"
    )
    data_error_attempts: int = Field(3, ge=1, description="tries of a batch ClickHouse refuses as data")
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    stats_interval_s: float = Field(10.0, gt=0)
    # The group coordinator waits up to about half of this for members when a consumer joins, and a killed
    # logger's partitions move to a new one after it: lower it for faster restarts on a quiet machine.
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    log_level: str = "INFO"

    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch_rows, self.max_batch_age_ms / 1000, self.max_batch_bytes)

    def lifecycle_policy(self) -> BatchPolicy:
        return BatchPolicy(self.lifecycle_batch_rows, self.max_batch_age_ms / 1000, self.max_batch_bytes)

    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.retry_initial_s, self.retry_max_s, self.data_error_attempts)

    def consumer_options(self) -> dict[str, int]:
        timeout = self.kafka_session_timeout_ms
        return {"session_timeout_ms": timeout, "heartbeat_interval_ms": max(100, timeout // 4)}


class _Assigned(ConsumerRebalanceListener):
    """Notes the first partition assignment (readiness). Revocations need nothing: a batch committed after
    its partitions moved fails to commit, its records are re-read by the new owner, and the sink skips the
    rows that are already stored."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.event.set()


class Logger:
    def __init__(self, settings: Settings, config: LoggerConfig | None = None, codec: AvroCodec | None = None) -> None:
        self.settings = settings
        self.config = config or LoggerConfig()
        self.codec = codec or AvroCodec()
        self.halt = threading.Event()  # ends the sinks' retry waits (they run in worker threads)
        retry = self.config.retry()
        self.interaction_sink = InteractionSink(
            settings, self.halt, retry, self.config.dedupe_window_s, codec=self.codec
        )
        self.lifecycle_sink = LifecycleSink(settings, self.halt, retry)
        latest = self.codec.latest[Interaction.SCHEMA]
        self.fast_prefix = MAGIC + latest.fingerprint
        self.totals: Counter[str] = Counter()
        self.publisher: Publisher | None = None
        # The three lifecycle loops share one sink, and a clickhouse-connect client is not for concurrent use.
        self._lifecycle_lock = threading.Lock()

    # Running -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        producer = create_producer(self.settings, linger_ms=5)
        options = self.config.consumer_options()
        # A larger fetch per partition: the interactions are read in batches of thousands.
        interactions = create_consumer(
            self.settings, self.config.group_id, max_partition_fetch_bytes=4 << 20, **options
        )
        # The lifecycle topics have other record types (a TopicReader each) and their own groups.
        lifecycle = [
            create_consumer(self.settings, f"{self.config.group_id}.{spec.table}", **options) for _, spec in LIFECYCLE
        ]
        consumers = [interactions, *lifecycle]
        listeners = [_Assigned() for _ in consumers]
        started: list[AIOKafkaProducer | AIOKafkaConsumer] = []
        tasks: list[asyncio.Task[Any]] = []
        try:
            for client in (producer, *consumers):
                if not await self._start(client, stop):
                    return
                started.append(client)
            self.publisher = Publisher(producer, self.codec)
            interactions.subscribe([topics.INTERACTIONS.name], listener=listeners[0])
            for consumer, listener, (topic, _) in zip(lifecycle, listeners[1:], LIFECYCLE, strict=True):
                consumer.subscribe([topic.name], listener=listener)
            tasks = [
                asyncio.create_task(self._interactions_loop(interactions, stop), name="interactions"),
                *(
                    asyncio.create_task(
                        self._lifecycle_loop(TopicReader(c, self.publisher, topic, SERVICE), spec, stop),
                        name=spec.table,
                    )
                    for c, (topic, spec) in zip(lifecycle, LIFECYCLE, strict=True)
                ),
            ]
            helpers = [
                asyncio.create_task(self._ready_when_assigned(listeners)),
                asyncio.create_task(self._report(stop)),
            ]
            log.info(
                "logger: %s → ClickHouse %s (batches of %d rows / %.0f ms)",
                ", ".join([topics.INTERACTIONS.name, *(t.name for t, _ in LIFECYCLE)]),
                self.settings.clickhouse_url,
                self.config.max_batch_rows,
                self.config.max_batch_age_ms,
            )
            try:
                await self._until_stopped(tasks, stop)
            finally:
                for helper in helpers:
                    helper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await helper
        finally:
            clear_ready(self.settings, SERVICE)
            self.halt.set()
            for task in tasks:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            for client in reversed(started):
                with contextlib.suppress(Exception):
                    await client.stop()
            self.interaction_sink.close()
            self.lifecycle_sink.close()
            self._log_totals("stopped")

    async def _until_stopped(self, tasks: list[asyncio.Task[Any]], stop: asyncio.Event) -> None:
        """Wait for the loops to end (they end when ``stop`` is set, after their last flush). A loop that
        fails stops the others: the process exits and its uncommitted records are re-read at the next start."""
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                # Let retries in worker threads give up; a write that is not retrying finishes normally.
                self.halt.set()
            failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
            if failed:
                stop.set()
                self.halt.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, SinkStopped):
                    log.warning(
                        "logger: %s: stopped before a batch was written; it is re-read at the next start",
                        task.get_name(),
                    )
                elif exc is not None:
                    log.error("logger: %s failed", task.get_name(), exc_info=exc)
        finally:
            stopper.cancel()

    async def _start(self, client: AIOKafkaProducer | AIOKafkaConsumer, stop: asyncio.Event) -> bool:
        """Start a Kafka client, retrying while the broker does not answer; False when stopped first."""
        retry = self.config.retry()
        attempt = 0
        while not stop.is_set():
            try:
                await client.start()
                return True
            except KafkaError as exc:
                delay = retry.delay(attempt)
                log.error(
                    "logger: Kafka at %s does not answer (%s); retrying in %.1f s",
                    self.settings.kafka_bootstrap,
                    exc,
                    delay,
                )
                attempt += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _ready_when_assigned(self, listeners: list[_Assigned]) -> None:
        await asyncio.gather(*(listener.event.wait() for listener in listeners))
        mark_ready(self.settings, SERVICE, clickhouse=self.settings.clickhouse_url)
        log.info("logger: ready (consumers assigned)")

    # Interactions ------------------------------------------------------------------------------
    async def _interactions_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        batcher: Batcher[Entry] = Batcher(self.config.policy())
        positions: dict[TopicPartition, int] = {}
        acks: list[Awaitable[Any]] = []  # dead letters produced for this batch, acknowledged before commit
        inflight: asyncio.Task[None] | None = None
        prefix = self.fast_prefix
        try:
            while not stop.is_set():
                wait_ms = max(1, int(min(batcher.wait_s(idle_s=POLL_S), POLL_S) * 1000))
                got = await consumer.getmany(timeout_ms=wait_ms, max_records=batcher.room())
                for tp, messages in got.items():
                    for msg in messages:
                        value = msg.value
                        if value is not None and value.startswith(prefix):
                            # The hot path: hand the body on untouched (ClickHouse decodes it).
                            batcher.add((msg, memoryview(value)[HEADER_LEN:]), len(value))
                        else:
                            batcher.add((msg, await self._slow_path(msg, acks)), len(value or b""))
                    positions[tp] = messages[-1].offset + 1
                if batcher.due():
                    if inflight is not None:
                        await inflight  # one write in flight; a failure (SinkStopped) ends the loop here
                    inflight = asyncio.create_task(self._flush_interactions(consumer, batcher.take(), positions, acks))
                    positions, acks = {}, []
            # Stopping: finish the write in flight, then write and commit what was read since.
            if inflight is not None:
                await inflight
                inflight = None
            if len(batcher):
                await self._flush_interactions(consumer, batcher.take(), positions, acks)
        finally:
            if inflight is not None and not inflight.done():
                # Only reached on an error: the thread's write cannot be interrupted; wait for its outcome
                # so nothing is committed behind it.
                with contextlib.suppress(Exception):
                    await inflight

    async def _slow_path(self, msg: ConsumerRecord, acks: list[Awaitable[Any]]) -> bytes | None:
        """A record that is not in the latest schema version: re-encode it, or dead-letter it."""
        try:
            record = self.codec.decode(msg.value, Interaction)
        except DecodeError as err:
            log.warning(
                "logger: %s[%d]@%d to %s: %s", msg.topic, msg.partition, msg.offset, topics.INTERACTIONS.dlq.name, err
            )
            acks.append(
                await self._dead_letter(
                    topics.INTERACTIONS.dlq, dead_letter_for(msg, err.kind, err.reason, SERVICE), msg.key
                )
            )
            return None
        return self.codec.encode(record)[HEADER_LEN:]

    async def _flush_interactions(
        self,
        consumer: AIOKafkaConsumer,
        entries: list[Entry],
        positions: dict[TopicPartition, int],
        acks: list[Awaitable[Any]],
    ) -> None:
        started = time.perf_counter()
        kept = [i for i, (_, body) in enumerate(entries) if body is not None]
        bodies = [entries[i][1] for i in kept]
        result = await asyncio.to_thread(self.interaction_sink.write, bodies)  # type: ignore[arg-type]
        for rejected in result.rejected:
            msg = entries[kept[rejected.index]][0]
            log.error(
                "logger: %s[%d]@%d to %s: %s: %s",
                msg.topic,
                msg.partition,
                msg.offset,
                topics.INTERACTIONS.dlq.name,
                rejected.kind,
                rejected.reason,
            )
            letter = dead_letter_for(msg, rejected.kind, rejected.reason, SERVICE)
            acks.append(await self._dead_letter(topics.INTERACTIONS.dlq, letter, msg.key))
        for ack in acks:
            await ack
        await self._commit(consumer, positions)
        self._count("interactions", len(entries), result, dead_letters=len(entries) - len(bodies))
        log.debug(
            "logger: interactions: %d read, %d written, %d duplicates, %d dead-lettered in %.1f ms",
            len(entries),
            result.written,
            result.duplicates,
            len(entries) - len(bodies) + len(result.rejected),
            (time.perf_counter() - started) * 1000,
        )

    # Lifecycle topics ---------------------------------------------------------------------------
    async def _lifecycle_loop(self, reader: TopicReader[Record], spec: TableSpec, stop: asyncio.Event) -> None:
        batcher: Batcher[Delivered[Record]] = Batcher(self.config.lifecycle_policy())
        batches: list[Batch[Record]] = []
        while not stop.is_set():
            wait_ms = max(1, int(min(batcher.wait_s(idle_s=POLL_S), POLL_S) * 1000))
            batch = await reader.read_batch(timeout_ms=wait_ms, max_records=batcher.room())
            if batch.positions:
                batches.append(batch)
                for delivered in batch.records:
                    batcher.add(delivered)
                self.totals[f"{spec.table}_dead_letters"] += batch.dead_letters
            # A read of nothing but dead letters is committed at once (they are already acknowledged).
            if batcher.due() or (batches and not len(batcher)):
                await self._flush_lifecycle(reader, spec, batcher.take(), batches)
                batches = []
        if batches:
            await self._flush_lifecycle(reader, spec, batcher.take(), batches)

    async def _flush_lifecycle(
        self, reader: TopicReader[Record], spec: TableSpec, items: list[Delivered[Record]], batches: list[Batch[Record]]
    ) -> None:
        result = await asyncio.to_thread(self._write_lifecycle, spec, [d.record for d in items])
        for rejected in result.rejected:
            d = items[rejected.index]
            log.error(
                "logger: %s[%d]@%d to %s: %s", d.topic, d.partition, d.offset, reader.topic.dlq.name, rejected.reason
            )
            letter = DeadLetter(
                source_topic=d.topic,
                partition=d.partition,
                offset=d.offset,
                key=d.key,
                value=self.codec.encode(d.record),
                error_kind=rejected.kind,
                error=rejected.reason,
                service=SERVICE,
            )
            await (await self._dead_letter(reader.topic.dlq, letter, d.key))
        try:
            await reader.commit(batches)
        except KafkaError as exc:
            log.warning(
                "logger: %s: commit failed (%s); the records are re-read and skipped as stored", spec.table, exc
            )
        self._count(spec.table, len(items), result)

    def _write_lifecycle(self, spec: TableSpec, records: list[Record]) -> WriteResult:
        with self._lifecycle_lock:
            return self.lifecycle_sink.write(spec, records)

    # Shared -------------------------------------------------------------------------------------
    async def _dead_letter(self, topic: TopicSpec, letter: DeadLetter, key: bytes | None) -> Awaitable[Any]:
        assert self.publisher is not None
        return await self.publisher.send_nowait(topic, letter, key)

    async def _commit(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:
        owned = consumer.assignment()
        offsets = {tp: pos for tp, pos in positions.items() if tp in owned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # The rows are in ClickHouse: at worst the records are read again and skipped as stored.
            log.warning("logger: commit failed (%s); the records are re-read and skipped as stored", exc)

    def _count(self, table: str, received: int, result: WriteResult, dead_letters: int = 0) -> None:
        self.totals[f"{table}_received"] += received
        self.totals[f"{table}_written"] += result.written
        self.totals[f"{table}_duplicates"] += result.duplicates
        self.totals[f"{table}_dead_letters"] += dead_letters + len(result.rejected)
        self.totals[f"{table}_batches"] += 1

    async def _report(self, stop: asyncio.Event) -> None:
        last: Counter[str] = Counter()
        last_t = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(self.config.stats_interval_s)
            if self.totals != last:
                now = time.monotonic()
                rate = (self.totals["interactions_written"] - last["interactions_written"]) / (now - last_t)
                self._log_totals(f"{rate:,.0f} interactions/s")
                last, last_t = Counter(self.totals), now

    def _log_totals(self, note: str) -> None:
        t = self.totals
        parts = [
            f"{table} {t[f'{table}_written']} written, {t[f'{table}_duplicates']} duplicates skipped, "
            f"{t[f'{table}_dead_letters']} dead-lettered"
            for table in ("interactions", *(spec.table for _, spec in LIFECYCLE))
            if t[f"{table}_received"] or t[f"{table}_dead_letters"]
        ]
        log.info("logger: %s; %s", note, "; ".join(parts) or "nothing written yet")


async def _main(settings: Settings, config: LoggerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Logger(settings, config).run(stop)


def main() -> None:
    try:
        config = LoggerConfig()
        settings = Settings.load()
    except (SettingsError, ValueError) as exc:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("flywheel.logger").error("logger: %s", exc)
        sys.exit(2)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level.upper() == "DEBUG":
        # The flush lines, not the clients' chatter.
        logging.getLogger("aiokafka").setLevel(logging.INFO)
        logging.getLogger("clickhouse_connect").setLevel(logging.INFO)
    asyncio.run(_main(settings, config))
