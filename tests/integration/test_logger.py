"""The logger on the real local stack: interactions and lifecycle events from the topics into ClickHouse,
exactly once (replays, SIGKILL and restart), bad records to the dead-letter topics, ClickHouse outages
waited out without committing, and SIGTERM flushing what was read.

Each test uses its own agent id (the session's broker and ClickHouse are shared) and its own consumer group,
and the logger's home (ready file) is a temporary directory, so a logger that another test module started
is not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from services.core import topics
from services.core.clickhouse import client
from services.core.codec import AvroCodec, DecodeError
from services.core.health import is_ready
from services.core.kafka import aiokafka_config, confluent_config, read_to_end
from services.core.lifecycle_store import read_lifecycle_events
from services.core.records import (
    ChatMessage,
    DatasetSnapshot,
    DeadLetter,
    GateVerdict,
    InferenceRequest,
    Interaction,
    ModelEvent,
    RetrainTriggered,
)
from services.core.settings import Settings
from services.logger.rows import INTERACTION_COLUMNS, interaction_row
from services.logger.service import Logger, LoggerConfig
from services.logger.sink import InteractionSink, RetryPolicy
from services.stack.process import free_port
from tests.unit.test_logger_rows import cases, interaction

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
CODEC = AvroCodec()
JSON_COLUMNS = {"messages", "teacher_tool_calls", "student_tool_calls"}


def agent(name: str) -> str:
    return f"log-{name}-{RUN}"


def config(**changes: Any) -> LoggerConfig:
    """A fresh consumer group (reads the topics from the start) and test-sized timings."""
    base: dict[str, Any] = {
        "group_id": f"test-logger-{uuid.uuid4().hex[:8]}",
        "kafka_session_timeout_ms": 2000,  # joins and takeovers in about a second
        "max_batch_age_ms": 100,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.5,
    }
    return LoggerConfig(**{**base, **changes})


@pytest.fixture(scope="module", autouse=True)
def no_session_logger(stack_manager) -> None:
    """These tests run their own loggers in the group flywheel-logger; one left running by another module
    would share their partitions."""
    for name in ("router", "logger"):
        stack_manager.stop(name)


@pytest.fixture(scope="module")
def ch(clickhouse, settings: Settings) -> Iterator[Client]:
    conn = client(settings)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def producer(broker, settings: Settings) -> Iterator[Producer]:
    prod = Producer({**confluent_config(settings), "linger.ms": 5})
    yield prod
    prod.flush(30)


def produce(producer: Producer, topic: str, payloads: list[tuple[bytes | None, bytes]], **kw: Any) -> dict[int, int]:
    """Produce and wait for delivery; returns the last offset written per partition."""
    last: dict[int, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        last[msg.partition()] = max(msg.offset(), last.get(msg.partition(), -1))

    for i, (key, value) in enumerate(payloads):
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=delivered, **kw)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 2000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return last


def encoded(records: list[Interaction]) -> list[tuple[bytes | None, bytes]]:
    return [(r.request_id.encode(), CODEC.encode(r)) for r in records]


def many(agent_id: str, n: int, start: int = 0) -> list[Interaction]:
    t0 = datetime.now(timezone.utc)
    return [
        interaction(agent_id, i, received_at=t0 + timedelta(microseconds=i), responded_at=t0)
        for i in range(start, start + n)
    ]


def sentinels(producer: Producer, agent_id: str) -> int:
    """One record per partition, produced after everything else: once all are stored, every earlier record
    of the topic has been processed (each partition is read in order)."""
    for p in range(topics.INTERACTIONS.partitions):
        rec = interaction(agent_id, 1_000_000 + p, received_at=datetime.now(timezone.utc))
        producer.produce(topics.INTERACTIONS.name, CODEC.encode(rec), key=rec.request_id.encode(), partition=p)
    assert producer.flush(30) == 0
    return topics.INTERACTIONS.partitions


def counts(ch: Client, agent_id: str) -> tuple[int, int]:
    sql = "SELECT count(), uniqExact(request_id) FROM interactions WHERE agent_id = {a:String}"
    return tuple(ch.query(sql, parameters={"a": agent_id}).result_rows[0])  # type: ignore[return-value]


async def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def wait_count(ch: Client, agent_id: str, n: int, timeout_s: float = 60.0) -> tuple[int, int]:
    await wait_for(lambda: counts(ch, agent_id)[0] >= n, f"{n} rows of {agent_id}", timeout_s)
    return counts(ch, agent_id)


@contextlib.asynccontextmanager
async def running(settings: Settings, cfg: LoggerConfig, home: Path) -> AsyncIterator[Logger]:
    """A logger in this process; its ready file under ``home``."""
    local = settings.model_copy(update={"home": home})
    logger = Logger(local, cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(logger.run(stop))
    try:
        await wait_for(lambda: is_ready(local, "logger") or task.done(), "the logger to be ready", 30)
        assert not task.done(), "the logger stopped while starting"
        yield logger
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# Class-scoped: a logger left running would also write the records of the tests after its class (which
# need ClickHouse "down", or their own process to be the only writer).
@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def logger(broker, clickhouse, settings: Settings, tmp_path_factory) -> AsyncIterator[Logger]:
    async with running(settings, config(), tmp_path_factory.mktemp("logger-home")) as lg:
        yield lg


async def read_dead_letters(
    settings: Settings, topic: str, wanted: set[bytes], timeout_s: float = 30
) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(
        topic, **aiokafka_config(settings), group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(found) < len(wanted) and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    try:
                        letter = CODEC.decode(m.value, DeadLetter)
                    except DecodeError:
                        continue  # another test's unreadable dead letter
                    if letter.value in wanted:
                        found.append(letter)
    finally:
        await consumer.stop()
    return found


def normalise(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS:
        return json.loads(value)  # same JSON value; ClickHouse's escapes may differ from Python's
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    if isinstance(value, float):
        return round(value, 9)
    return value


# The sink: ClickHouse's mapping against the Python one, duplicates, corrupt bodies ----------------------
def test_clickhouse_maps_every_combination_like_the_python_mapping(ch: Client, settings: Settings) -> None:
    aid = agent("mapping")
    records = list(cases(aid).values())
    sink = InteractionSink(settings)
    try:
        bodies = [CODEC.encode(r) for r in records]
        result = sink.write(bodies)
        assert (result.written, result.duplicates, result.rejected) == (len(records), 0, [])
        again = sink.write(bodies[:3] + bodies[:3])  # a replay, repeated within its batch too
        assert (again.written, again.duplicates) == (0, 6)
    finally:
        sink.close()
    sql = f"SELECT {', '.join(INTERACTION_COLUMNS)} FROM interactions WHERE agent_id = {{a:String}} ORDER BY request_id"
    stored = ch.query(sql, parameters={"a": aid}).result_rows
    expected = sorted((interaction_row(r) for r in records), key=lambda row: row[0])
    assert len(stored) == len(expected)
    for got, want in zip(stored, expected, strict=True):
        for column, g, w in zip(INTERACTION_COLUMNS, got, want, strict=True):
            assert normalise(column, g) == normalise(column, w), (want[0], column, g, w)


def test_a_request_served_again_days_later_is_not_stored_twice(ch: Client, settings: Settings) -> None:
    aid = agent("served-twice")
    first = many(aid, 3)
    # The same request ids served again (a router restarted before committing), three days later.
    later = [r.model_copy(update={"received_at": r.received_at + timedelta(days=3)}) for r in first]
    sink = InteractionSink(settings)
    try:
        assert sink.write([CODEC.encode(r) for r in first]).written == 3
        again = sink.write([CODEC.encode(r) for r in later])
    finally:
        sink.close()
    assert (again.written, again.duplicates) == (0, 3)
    assert counts(ch, aid) == (3, 3)


def test_a_corrupt_body_is_rejected_and_the_rest_of_its_batch_written(ch: Client, settings: Settings) -> None:
    aid = agent("corrupt")
    records = many(aid, 5)
    bodies = [CODEC.encode(r) for r in records]
    bodies[2] = bodies[2][:-7]  # cut short: ClickHouse's Avro reader runs off the record's block
    sink = InteractionSink(settings, retry=RetryPolicy(0.01, 0.05, data_attempts=2))
    try:
        result = sink.write(bodies)
    finally:
        sink.close()
    assert [(r.index, r.kind) for r in result.rejected] == [(2, "truncated")]
    assert result.written == 4
    assert counts(ch, aid) == (4, 4)


# The service -----------------------------------------------------------------------------------------
class TestService:
    """One logger in this process for the class."""

    async def test_interactions_are_stored_once_and_replays_are_skipped(
        self, logger, ch: Client, producer: Producer
    ) -> None:
        aid = agent("replay")
        records = many(aid, 3000)
        produce(producer, topics.INTERACTIONS.name, encoded(records))
        assert await wait_count(ch, aid, 3000) == (3000, 3000)

        produce(producer, topics.INTERACTIONS.name, encoded(records[:1500]))  # the same records again
        extra = sentinels(producer, aid)
        await wait_count(ch, aid, 3000 + extra)
        assert counts(ch, aid) == (3000 + extra, 3000 + extra)  # count() exact, no FINAL needed
        assert logger.totals["interactions_duplicates"] >= 1500

    async def test_malformed_payloads_go_to_the_dlq_and_later_records_are_written(
        self, logger, ch: Client, producer: Producer, settings: Settings
    ) -> None:
        aid = agent("dlq")
        good = many(aid, 3)
        truncated = CODEC.encode(good[1])[:-5]  # a valid header, a cut body: found when ClickHouse refuses it
        other_record = CODEC.encode(
            InferenceRequest(conversation_id="c", agent_id=aid, messages=[ChatMessage(role="user", content="hi")])
        )
        garbage = f'{{"not": "avro", "agent": "{aid}"}}'.encode()
        produce(
            producer,
            topics.INTERACTIONS.name,
            [
                (b"k", garbage),
                (b"k", other_record),
                (b"k", truncated),
                (b"k", CODEC.encode(good[0])),
                (b"k", CODEC.encode(good[2])),
            ],
        )
        assert await wait_count(ch, aid, 2) == (2, 2)
        letters = await read_dead_letters(settings, topics.INTERACTIONS.dlq.name, {garbage, other_record, truncated})
        kinds = {letter.value: letter.error_kind for letter in letters}
        assert kinds == {garbage: "not_single_object", other_record: "wrong_record", truncated: "truncated"}
        assert all(letter.service == "logger" and letter.source_topic == topics.INTERACTIONS.name for letter in letters)

    async def test_dead_letters_of_every_topic_are_stored_and_can_be_replayed(
        self, logger, ch: Client, producer: Producer, settings: Settings
    ) -> None:
        from services.core.dead_letters import describe_value, get_letter, list_letters, replay

        marker = uuid.uuid4().hex
        request = CODEC.encode(interaction(agent("dlq"), 1))  # any record's bytes stand for the failed one
        letter = DeadLetter(
            source_topic=topics.REQUESTS.name,
            partition=2,
            offset=41,
            key=b"conv-" + marker.encode(),
            value=request,
            error_kind="unknown_agent",
            error=f"unknown agent {marker}",
            service="router",
        )
        produce(producer, topics.REQUESTS.dlq.name, [(letter.key, CODEC.encode(letter))])
        produce(producer, topics.MODELS.dlq.name, [(None, b"not a dead letter " + marker.encode())])

        def stored() -> list[tuple[str, str]]:
            sql = "SELECT source_topic, error_kind FROM dead_letters WHERE error LIKE {m:String} ORDER BY source_topic"
            return ch.query(sql, parameters={"m": f"%{marker}%"}).result_rows

        await wait_for(lambda: len(stored()) >= 1, "the router's dead letter in ClickHouse")
        got = [x for x in list_letters(ch, topic="requests", kind="unknown_agent", limit=1000) if marker in x.error]
        assert len(got) == 1 and got[0].key == letter.key and got[0].value == request
        shown = get_letter(ch, got[0].id)
        assert describe_value(shown)[0] == "record" and shown.source_offset == 41
        unreadable = await wait_for(
            lambda: [x for x in list_letters(ch, topic="models", limit=1000) if marker.encode() in (x.value or b"")],
            "the unreadable dead letter, kept whole",
        )
        assert unreadable[0].error_kind == "unreadable_dead_letter"

        assert await replay(settings, [shown]) == 1
        assert get_letter(ch, shown.id).replays == 1
        records = await read_to_end(settings, topics.REQUESTS.name)
        assert any(r.key == letter.key and r.value == request for r in records)  # back on its source topic

    async def test_lifecycle_events_land_in_their_tables_once(
        self, logger, ch: Client, producer: Producer, settings: Settings
    ) -> None:
        aid = agent("lifecycle")
        event = ModelEvent(
            agent_id=aid,
            kind="promoted",
            model_name=f"student_{aid}",
            model_version=2,
            metrics={"agreement": 0.95},
            gate=GateVerdict(passed=True, mode="overall"),
        )
        snapshot = DatasetSnapshot(
            snapshot_id=f"snap-{aid}",
            agent_id=aid,
            version=1,
            content_hash="h",
            uri="file:///s",
            split_counts={"train": 9, "holdout": 2},
            intent_counts={"card_arrival": 11},
            filter_stats={"hedging": 3},
            parent_snapshot_id="snap-parent",
            trigger_reason="grace_complete",
        )
        retrain = RetrainTriggered(agent_id=aid, reason="agreement_drift", evidence='{"agreement": 0.81}')
        bad = b"\xc3\x01" + b"\x00" * 8 + b"x"
        for topic, record in ((topics.MODELS, event), (topics.DATASETS, snapshot), (topics.RETRAIN, retrain)):
            payload = CODEC.encode(record)
            produce(producer, topic.name, [(aid.encode(), payload), (aid.encode(), payload)])  # and a replay
        produce(producer, topics.MODELS.name, [(aid.encode(), bad)])

        def stored() -> list[int]:
            return [
                ch.command(f"SELECT count() FROM {table} WHERE agent_id = {{a:String}}", parameters={"a": aid})
                for table in ("model_events", "datasets", "retrain_events")
            ]

        await wait_for(lambda: stored() == [1, 1, 1], "one row in each lifecycle table")
        row = ch.query(
            "SELECT kind, model_version, gate_passed, metrics['agreement'] FROM model_events"
            " WHERE agent_id = {a:String}",
            parameters={"a": aid},
        ).result_rows
        assert row == [("promoted", 2, True, 0.95)]
        assert ch.command("SELECT reason FROM retrain_events WHERE agent_id = {a:String}", parameters={"a": aid}) == (
            "agreement_drift"
        )
        # What a restarting service rebuilds its lifecycle from: the same events, read back.
        back = {type(e).__name__: e for e in read_lifecycle_events(ch) if e.agent_id == aid}
        assert back["DatasetSnapshot"] == snapshot
        assert back["RetrainTriggered"] == retrain
        assert back["ModelEvent"].metrics == event.metrics and back["ModelEvent"].gate == event.gate
        letters = await read_dead_letters(settings, topics.MODELS.dlq.name, {bad})
        assert [letter.error_kind for letter in letters] == ["unknown_fingerprint"]
        await asyncio.sleep(1.0)  # the replays had time to land, and did not
        assert stored() == [1, 1, 1]


async def test_two_loggers_in_one_group_share_the_partitions_without_double_writes(
    broker, clickhouse, ch: Client, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    """A second logger joins while the first writes: the partitions are rebalanced between them (the first
    finishes its writes in flight and drops what the second will read again); every record counts once."""
    aid = agent("rebalance")
    cfg = config()
    first = many(aid, 6000)
    async with running(settings, cfg, tmp_path / "a") as a:
        produce(producer, topics.INTERACTIONS.name, encoded(first[:3000]))
        await wait_count(ch, aid, 1)
        async with running(settings, cfg, tmp_path / "b") as b:
            # In chunks, so the records keep coming while the group rebalances between the two.
            for start in range(3000, 6000, 500):
                produce(producer, topics.INTERACTIONS.name, encoded(first[start : start + 500]))
                await asyncio.sleep(0.5)
            extra = sentinels(producer, aid)
            await wait_count(ch, aid, 6000 + extra)
            # Every record is there exactly once by request_id. A rebalance that lands while a batch is still
            # being read (or past REVOKE_WAIT_S on a loaded machine) can let both loggers write it: then the
            # ReplacingMergeTree key collapses the copy (FINAL or the next merge); see docs/sql.md.
            total, unique = counts(ch, aid)
            assert unique == 6000 + extra
            final = ch.query(
                "SELECT count() FROM interactions FINAL WHERE agent_id = {a:String}", parameters={"a": aid}
            ).result_rows[0][0]
            assert final == 6000 + extra, (total, unique, final)
            # Which logger wrote what depends on when the rebalance lands (on a loaded 2-core machine the
            # second may join after the first has written everything); together they wrote each record.
            written = a.totals["interactions_written"] + b.totals["interactions_written"]
            assert written >= 6000


class Gate:
    """A TCP forwarder to the real endpoint that can be shut: ClickHouse "down", then "up" again."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.AbstractServer | None = None
        self.links: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            for task in (
                asyncio.create_task(pipe(reader, up_writer)),
                asyncio.create_task(pipe(up_reader, writer)),
            ):
                self.links.add(task)
                task.add_done_callback(self.links.discard)

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.links):
                task.cancel()
            await asyncio.gather(*self.links, return_exceptions=True)
            await self.server.wait_closed()


async def committed(settings: Settings, group: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(**aiokafka_config(settings), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {
            p: await consumer.committed(TopicPartition(topics.INTERACTIONS.name, p))
            for p in range(topics.INTERACTIONS.partitions)
        }
    finally:
        await consumer.stop()


async def test_clickhouse_outage_commits_nothing_then_recovers(
    broker, clickhouse, ch: Client, producer: Producer, settings: Settings, tmp_path: Path, caplog
) -> None:
    aid = agent("outage")
    gate = Gate(int(settings.clickhouse_url.rsplit(":", 1)[1]))
    down = settings.model_copy(update={"clickhouse_url": f"http://127.0.0.1:{gate.port}"})
    cfg = config()
    async with running(down, cfg, tmp_path):
        last = produce(producer, topics.INTERACTIONS.name, encoded(many(aid, 200)))
        await wait_for(lambda: f"ClickHouse http://127.0.0.1:{gate.port}" in caplog.text, "the outage to be logged")
        await asyncio.sleep(1.0)
        assert counts(ch, aid) == (0, 0)
        # Nothing committed while ClickHouse is down: a restart would read every record again.
        assert all(pos is None for pos in (await committed(settings, cfg.group_id)).values())
        await gate.open()
        try:
            assert await wait_count(ch, aid, 200) == (200, 200)
            extra = sentinels(producer, aid)
            await wait_count(ch, aid, 200 + extra)
        finally:
            await gate.close()
    assert counts(ch, aid) == (200 + extra, 200 + extra)
    positions = await committed(settings, cfg.group_id)
    assert all((positions[p] or 0) > offset for p, offset in last.items())  # committed once written


# The process: SIGKILL and restart, SIGTERM -----------------------------------------------------------
def logger_env(settings: Settings, home: Path, group: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_HOME=str(home),
        FLYWHEEL_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        FLYWHEEL_CLICKHOUSE_URL=settings.clickhouse_url,
        FLYWHEEL_LOGGER_GROUP_ID=group,
        FLYWHEEL_LOGGER_KAFKA_SESSION_TIMEOUT_MS="2000",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def start_logger(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.logger"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )


async def wait_ready(home: Path, proc: subprocess.Popen, log_path: Path) -> None:
    local = Settings(home=home)
    await wait_for(lambda: is_ready(local, "logger", proc.pid) or proc.poll() is not None, "logger process", 60)
    assert proc.poll() is None, log_path.read_text()[-3000:]


async def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    broker, clickhouse, ch: Client, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    aid = agent("sigkill")
    n = 20_000
    records = encoded(many(aid, n))
    env = logger_env(settings, tmp_path, f"test-logger-{uuid.uuid4().hex[:8]}", FLYWHEEL_LOGGER_MAX_BATCH_ROWS="1000")
    log_path = tmp_path / "logger.log"
    proc = start_logger(env, log_path)
    restarted = None
    try:
        await wait_ready(tmp_path, proc, log_path)
        # Produce while the logger runs: 40 chunks of 500, a few seconds in all.
        feeder = threading.Thread(
            target=lambda: [
                (produce(producer, topics.INTERACTIONS.name, records[i : i + 500]), time.sleep(0.1))
                for i in range(0, n, 500)
            ]
        )
        feeder.start()
        await wait_count(ch, aid, 2000)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        at_kill = counts(ch, aid)[0]
        feeder.join(60)
        assert 0 < at_kill < n, f"the kill was not mid-stream ({at_kill} of {n} stored)"

        restarted = start_logger(env, log_path)
        await wait_ready(tmp_path, restarted, log_path)
        await wait_count(ch, aid, n, timeout_s=90)
        extra = sentinels(producer, aid)
        await wait_count(ch, aid, n + extra)
        assert counts(ch, aid) == (n + extra, n + extra)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0
    finally:
        for p in (proc, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


async def test_sigterm_flushes_what_was_read_then_commits(
    broker, clickhouse, ch: Client, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    aid = agent("sigterm")
    group = f"test-logger-{uuid.uuid4().hex[:8]}"
    # Batches that never fill or age during the test: only the shutdown writes them.
    env = logger_env(
        settings,
        tmp_path,
        group,
        FLYWHEEL_LOGGER_MAX_BATCH_ROWS="10000000",
        FLYWHEEL_LOGGER_MAX_BATCH_AGE_MS="600000",
        FLYWHEEL_LOGGER_STATS_INTERVAL_S="0.2",
    )
    log_path = tmp_path / "logger.log"
    proc = start_logger(env, log_path)
    try:
        await wait_ready(tmp_path, proc, log_path)
        last = produce(producer, topics.INTERACTIONS.name, encoded(many(aid, 300)))
        # A new group reads the topic from its start: every record up to ours (offsets count from 0).
        total = sum(offset + 1 for offset in last.values())

        def read() -> int:
            return max((int(n) for n in re.findall(r"interactions read (\d+)", log_path.read_text())), default=0)

        await wait_for(lambda: read() >= total, f"the logger to read {total} records")
        assert counts(ch, aid) == (0, 0)  # read, not written: the batch is neither full nor old
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert counts(ch, aid) == (300, 300)
    # Everything read was committed after the insert. (Not compared with the topic's end offsets: the local
    # broker reports the last batch's base offset + 1 as the high watermark.)
    positions = await committed(settings, group)
    assert all((positions[p] or 0) > offset for p, offset in last.items())
