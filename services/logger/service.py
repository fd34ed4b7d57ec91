"""The logger: ``flywheel.interactions`` → ClickHouse ``interactions``; the lifecycle topics
(``flywheel.models``, ``flywheel.datasets``, ``flywheel.retrain``) → ``model_events``, ``datasets``,
``retrain_events``, the durable record that starting services rebuild their state from; ``flywheel.control`` →
``control_events`` (an audit trail of run-time changes); and every ``.dlq`` topic → ``dead_letters``
(``flywheel dlq list|show|replay``).

At least once, never twice: offsets are committed only after the batch is in ClickHouse (and its dead
letters are acknowledged), and the sink leaves out records already stored, so a replay after a crash or a
rebalance writes nothing twice. Batches are written when they are full or old enough (``batching``). The
interactions partitions are shared among ``insert_lanes`` lanes (partition % lanes), each with one write in
flight while the next batch is read: a record's key is its request id, so repeats of a request always meet
in the same lane, in order, and the duplicate check stays exact while the lanes write at once.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core import topics
from services.core.codec import MAGIC, AvroCodec, DecodeError
from services.core.health import clear_ready, mark_ready
from services.core.kafka import (
    Batch,
    Delivered,
    Publisher,
    TopicReader,
    create_consumer,
    create_follower,
    create_producer,
    dead_letter_for,
)
from services.core.records import DeadLetter, Interaction, Record
from services.core.settings import Settings, SettingsError
from services.core.topics import TopicSpec
from services.logger.batching import Batcher, BatchPolicy
from services.logger.rows import (
    CONTROL_EVENTS,
    DATASETS,
    DEAD_LETTERS,
    MODEL_EVENTS,
    RETRAIN_EVENTS,
    TableSpec,
    stored_dead_letter,
)
from services.logger.sink import InteractionSink, LifecycleSink, RetryPolicy, SinkStopped, WriteResult

log = logging.getLogger("flywheel.logger")
SERVICE = "logger"
POLL_S = 0.5  # the longest a read waits, so a stop request is noticed within it
REVOKE_WAIT_S = 30.0  # how long a rebalance waits for the writes in flight of the partitions leaving

LIFECYCLE: tuple[tuple[TopicSpec, TableSpec], ...] = (
    (topics.MODELS, MODEL_EVENTS),
    (topics.DATASETS, DATASETS),
    (topics.RETRAIN, RETRAIN_EVENTS),
    (topics.CONTROL, CONTROL_EVENTS),
)


class LoggerFailed(RuntimeError):
    """A loop of the logger failed on something other than a stop request (see the log for its traceback)."""


class LoggerConfig(BaseSettings):
    """The logger's own knobs (``FLYWHEEL_LOGGER_<NAME>``); the shared ones are in ``Settings``."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_LOGGER_", extra="forbid")

    group_id: str = "flywheel-logger"
    # Measured (benchmarks/bench_logger.py): per-insert costs dominate below ~20,000 rows (5,000-row batches
    # write at about 60 % of the rate); the age bound keeps light traffic fresh whatever the size.
    max_batch_rows: int = Field(20_000, ge=1, description="write a batch once it holds this many records")
    max_batch_age_ms: float = Field(200.0, ge=0, description="... or once its oldest record waited this long")
    max_batch_bytes: int = Field(64 << 20, ge=1, description="... or once it holds this many bytes")
    lifecycle_batch_rows: int = Field(1000, ge=1)
    # Writes in flight at once, each for its own share of the partitions (partition % lanes), so a request id
    # (the record key) is always written by the same lane, in order, and the duplicate check stays exact.
    # One ClickHouse insert is mostly single-threaded: a second lane uses a second core.
    insert_lanes: int = Field(2, ge=1, le=64)
    data_error_attempts: int = Field(3, ge=1, description="tries of a batch ClickHouse refuses as data")
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    stats_interval_s: float = Field(10.0, gt=0)
    # The group coordinator waits up to about half of this for members when a consumer joins, and a killed
    # logger's partitions move to a new one after it: lower it for faster restarts on a quiet machine.
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def load(cls, **overrides: Any) -> LoggerConfig:
        """Build the config, with one message that names each bad key and its variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(map(str, e['loc']))} (FLYWHEEL_LOGGER_{'_'.join(map(str, e['loc'])).upper()}): {e['msg']}"
                for e in exc.errors()
            ]
            raise SettingsError("bad logger settings: " + "; ".join(problems)) from exc

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
    """Notes the first partition assignment (readiness), and lets the logger release partitions that move to
    another logger before they go (``on_revoke``)."""

    def __init__(self, on_revoke: Callable[[set[TopicPartition]], Awaitable[None]] | None = None) -> None:
        self.event = asyncio.Event()
        self.on_revoke = on_revoke

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.on_revoke is not None and revoked:
            await self.on_revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.event.set()


@dataclass
class _Lane:
    """One share of the interactions partitions: its open batch and its write in flight."""

    sink: InteractionSink
    batcher: Batcher[ConsumerRecord]
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    # Records off the hot path, by (partition, offset): the re-encoded record, or None if dead-lettered.
    replaced: dict[tuple[int, int], bytes | None] = field(default_factory=dict)
    acks: list[Awaitable[Any]] = field(default_factory=list)  # dead letters, acknowledged before the commit
    inflight: asyncio.Task[None] | None = None

    def drop(self, revoked: set[TopicPartition]) -> None:
        """Forget the open batch's records of partitions that moved to another logger (it reads them again)."""
        if not any(tp in revoked for tp in self.positions):
            return
        gone = {tp.partition for tp in revoked}
        kept = [m for m in self.batcher.take() if TopicPartition(m.topic, m.partition) not in revoked]
        self.batcher.extend(kept, sum(len(m.value or b"") for m in kept))
        self.positions = {tp: pos for tp, pos in self.positions.items() if tp not in revoked}
        self.replaced = {key: value for key, value in self.replaced.items() if key[0] not in gone}

    async def settle(self) -> None:
        """Wait for the write in flight, if any (its exception, e.g. SinkStopped, propagates)."""
        task, self.inflight = self.inflight, None
        if task is not None:
            await task


class Logger:
    def __init__(self, settings: Settings, config: LoggerConfig | None = None, codec: AvroCodec | None = None) -> None:
        self.settings = settings
        self.config = config or LoggerConfig()
        self.codec = codec or AvroCodec()
        self.halt = threading.Event()  # ends the sinks' retry waits (they run in worker threads)
        retry = self.config.retry()
        self.interaction_sinks = [
            InteractionSink(settings, self.halt, retry, codec=self.codec) for _ in range(self.config.insert_lanes)
        ]
        self.lifecycle_sink = LifecycleSink(settings, self.halt, retry)
        latest = self.codec.latest[Interaction.SCHEMA]
        self.fast_prefix = MAGIC + latest.fingerprint
        self.totals: Counter[str] = Counter()
        # Where the interactions loop spends its time: a reader that mostly waits for the previous write means
        # ClickHouse is the bottleneck; one that mostly reads means Kafka or this process is.
        self.busy: Counter[str] = Counter()
        self.publisher: Publisher | None = None
        self._lanes: list[_Lane] = []
        # The lifecycle and dead-letter loops share one sink; a clickhouse-connect client is not for concurrent use.
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
            create_follower(self.settings, f"{self.config.group_id}.{spec.table}", **options) for _, spec in LIFECYCLE
        ]
        # Every .dlq topic, into dead_letters (flywheel dlq list|show|replay).
        dead_letters = create_follower(self.settings, f"{self.config.group_id}.{DEAD_LETTERS.table}", **options)
        consumers = [interactions, *lifecycle, dead_letters]
        listeners = [_Assigned(self._release), *(_Assigned() for _ in lifecycle), _Assigned()]
        started: list[AIOKafkaProducer | AIOKafkaConsumer] = []
        tasks: list[asyncio.Task[Any]] = []
        try:
            for client in (producer, *consumers):
                if not await self._start(client, stop):
                    return
                started.append(client)
            self.publisher = Publisher(producer, self.codec)
            interactions.subscribe([topics.INTERACTIONS.name], listener=listeners[0])
            for consumer, listener, (topic, _) in zip(lifecycle, listeners[1:-1], LIFECYCLE, strict=True):
                consumer.subscribe([topic.name], listener=listener)
            dead_letters.subscribe([spec.dlq.name for spec in topics.CATALOGUE], listener=listeners[-1])
            tasks = [
                asyncio.create_task(self._interactions_loop(interactions, stop), name="interactions"),
                *(
                    asyncio.create_task(
                        self._lifecycle_loop(TopicReader(c, self.publisher, topic, SERVICE), spec, stop),
                        name=spec.table,
                    )
                    for c, (topic, spec) in zip(lifecycle, LIFECYCLE, strict=True)
                ),
                asyncio.create_task(self._dead_letters_loop(dead_letters, stop), name=DEAD_LETTERS.table),
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
            for sink in self.interaction_sinks:
                sink.close()
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
            fatal: list[BaseException] = []
            for task in tasks:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, SinkStopped):
                    log.warning(
                        "logger: %s: stopped before a batch was written; it is re-read at the next start",
                        task.get_name(),
                    )
                elif exc is not None:
                    log.error("logger: %s failed", task.get_name(), exc_info=exc)
                    fatal.append(exc)
            if fatal:
                # A bug, not a stop: exit non-zero so whatever supervises the process sees it.
                raise LoggerFailed(f"{len(fatal)} loop(s) failed; uncommitted records are re-read at the next start")
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
        lanes = self._lanes = [_Lane(sink, Batcher(self.config.policy())) for sink in self.interaction_sinks]
        prefix = self.fast_prefix
        read_max = self.config.max_batch_rows * len(lanes)
        try:
            while not stop.is_set():
                wait_s = min(min(lane.batcher.wait_s(idle_s=POLL_S) for lane in lanes), POLL_S)
                read_started = time.perf_counter()
                got = await consumer.getmany(timeout_ms=max(1, int(wait_s * 1000)), max_records=read_max)
                self.busy["reading"] += time.perf_counter() - read_started
                self.totals["interactions_read"] += sum(map(len, got.values()))
                for tp, messages in got.items():
                    lane = lanes[tp.partition % len(lanes)]
                    while messages:
                        # Fill the lane's batch exactly to its size bound, write it, go on with the rest.
                        part, messages = messages[: lane.batcher.room()], messages[lane.batcher.room() :]
                        await self._add(lane, tp, part, prefix)
                        if lane.batcher.full():
                            await self._start_flush(consumer, lane)
                for lane in lanes:
                    if lane.batcher.due():
                        await self._start_flush(consumer, lane)
            # Stopping: finish the writes in flight, then write and commit what was read since.
            for lane in lanes:
                await lane.settle()
            for lane in lanes:
                if len(lane.batcher):
                    await self._start_flush(consumer, lane)
                    await lane.settle()
        finally:
            # On an error (a lane's SinkStopped): the other lanes' writes cannot be interrupted; wait for
            # their outcome, so nothing is left half done behind the process's exit.
            for lane in lanes:
                with contextlib.suppress(Exception):
                    await lane.settle()

    async def _release(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move to another logger (a rebalance): let the writes in flight finish and commit
        while they are still ours, and drop the open batches' records of those partitions (the new owner
        reads them again), so two loggers do not write the same records at once. Waits at most
        REVOKE_WAIT_S (a write retrying through a ClickHouse outage must not hold the group for ever); after
        that, or if records were in hand mid-read, the duplicate check and then the table's
        ReplacingMergeTree key are what keep a record from counting twice."""
        pending = [lane.inflight for lane in self._lanes if lane.inflight is not None]
        if pending:
            await asyncio.wait(pending, timeout=REVOKE_WAIT_S)
        for lane in self._lanes:
            lane.drop(revoked)
        log.info("logger: released %s", ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked)))

    async def _add(self, lane: _Lane, tp: TopicPartition, messages: list[ConsumerRecord], prefix: bytes) -> None:
        values = [m.value or b"" for m in messages]
        # The hot path, a partition's read at a time: records in the latest schema version are handed on
        # untouched (ClickHouse decodes them); nothing per record but this check.
        if not all(v.startswith(prefix) for v in values):
            for msg, value in zip(messages, values, strict=True):
                if not value.startswith(prefix):
                    lane.replaced[(msg.partition, msg.offset)] = await self._slow_path(msg, lane.acks)
        lane.batcher.extend(messages, sum(map(len, values)))
        lane.positions[tp] = messages[-1].offset + 1

    async def _start_flush(self, consumer: AIOKafkaConsumer, lane: _Lane) -> None:
        """Start writing the lane's batch, once its previous write is done (one in flight per lane)."""
        if lane.inflight is not None:
            blocked = time.perf_counter()
            await lane.settle()  # a failure (SinkStopped) ends the loop here
            self.busy["waiting_for_clickhouse"] += time.perf_counter() - blocked
        flush = self._flush_interactions(
            consumer, lane.sink, lane.batcher.take(), lane.replaced, lane.positions, lane.acks
        )
        lane.inflight = asyncio.create_task(flush)
        lane.positions, lane.replaced, lane.acks = {}, {}, []

    async def _slow_path(self, msg: ConsumerRecord, acks: list[Awaitable[Any]]) -> bytes | None:
        """A record that is not in the latest schema version: re-encode it, or dead-letter it."""
        try:
            record = self.codec.decode(msg.value, Interaction)
        except DecodeError as err:
            log.warning(
                "logger: %s[%d]@%d to %s: %s", msg.topic, msg.partition, msg.offset, topics.INTERACTIONS.dlq.name, err
            )
            letter = dead_letter_for(msg, err.kind, err.reason, SERVICE)
            acks.append(await self._dead_letter(topics.INTERACTIONS.dlq, letter, msg.key))
            return None
        return self.codec.encode(record)

    async def _flush_interactions(
        self,
        consumer: AIOKafkaConsumer,
        sink: InteractionSink,
        entries: list[ConsumerRecord],
        replaced: dict[tuple[int, int], bytes | None],
        positions: dict[TopicPartition, int],
        acks: list[Awaitable[Any]],
    ) -> None:
        started = time.perf_counter()
        kept: list[int] | None = None  # positions in `entries` of the records written, when some were left out
        if replaced:
            values = [replaced.get((m.partition, m.offset), m.value) for m in entries]
            kept = [i for i, v in enumerate(values) if v is not None]
            records = [values[i] for i in kept]
        else:
            records = [m.value for m in entries]
        result = await asyncio.to_thread(sink.write, records)  # type: ignore[arg-type]
        for rejected in result.rejected:
            msg = entries[rejected.index if kept is None else kept[rejected.index]]
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
        dead = len(entries) - len(records)
        self._count("interactions", len(entries), result, dead_letters=dead)
        log.debug(
            "logger: interactions: %d read, %d written, %d duplicates, %d dead-lettered in %.1f ms",
            len(entries),
            result.written,
            result.duplicates,
            dead + len(result.rejected),
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

    # Dead letters -------------------------------------------------------------------------------
    async def _dead_letters_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Every .dlq record into dead_letters, committed once stored (a re-read collapses on the id)."""
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=int(POLL_S * 1000), max_records=self.config.lifecycle_batch_rows)
            letters = [stored_dead_letter(msg, self.codec) for messages in got.values() for msg in messages]
            if not letters:
                continue
            result = await asyncio.to_thread(self._write_lifecycle, DEAD_LETTERS, letters)  # type: ignore[arg-type]
            for rejected in result.rejected:  # a raw-bytes row ClickHouse refuses: nowhere further to put it
                log.error("logger: dead letter %s could not be stored: %s", letters[rejected.index].id, rejected.reason)
            positions = {tp: messages[-1].offset + 1 for tp, messages in got.items()}
            try:
                await consumer.commit(positions)
            except KafkaError as exc:
                log.warning("logger: dead letters: commit failed (%s); re-read and skipped as stored", exc)
            self._count(DEAD_LETTERS.table, len(letters), result)

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
            for table in ("interactions", *(spec.table for _, spec in LIFECYCLE), DEAD_LETTERS.table)
            if t[f"{table}_received"] or t[f"{table}_dead_letters"]
        ]
        if t["interactions_read"]:
            # Read but not yet written: the open batches and the writes in flight.
            parts.insert(0, f"interactions read {t['interactions_read']}")
        log.info("logger: %s; %s", note, "; ".join(parts) or "nothing written yet")
        if self.busy:
            log.debug(
                "logger: interactions loop: %.1f s reading, %.1f s waiting for the previous write",
                self.busy["reading"],
                self.busy["waiting_for_clickhouse"],
            )


async def _main(settings: Settings, config: LoggerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Logger(settings, config).run(stop)


def main() -> None:
    try:
        config = LoggerConfig.load()
        settings = Settings.load()
    except SettingsError as exc:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("flywheel.logger").error("logger: %s", exc)
        sys.exit(2)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level == "DEBUG":
        # The flush lines, not the clients' chatter.
        logging.getLogger("aiokafka").setLevel(logging.INFO)
        logging.getLogger("clickhouse_connect").setLevel(logging.INFO)
    try:
        asyncio.run(_main(settings, config))
    except LoggerFailed as exc:
        log.error("logger: %s", exc)
        sys.exit(1)
