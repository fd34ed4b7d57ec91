"""The drift monitor on the local stack: lifecycle events and interactions go through the logger into
ClickHouse; the monitor (a process of its own) triggers exactly one retrain per drifting agent, with the
right reason and evidence, none for healthy traffic or traffic served before the current promotion, and
none during the cool-down, even after a SIGKILL and a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
import yaml
from aiokafka import TopicPartition

from services.core import topics
from services.core.clickhouse import client as ch_client
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.records import (
    Answer,
    ChatMessage,
    DatasetSnapshot,
    Interaction,
    ModelEvent,
    Record,
    RetrainTriggered,
    utcnow,
)
from services.core.settings import Settings
from services.stack.process import ProcessManager

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
TOOLS = {"card_arrival": "card_delivery_status", "exchange_rate": "exchange_rates", "lost_or_stolen_card": "card_block"}
TRAINED = {"card_arrival": 30, "exchange_rate": 30, "lost_or_stolen_card": 30}
DRIFT = {
    "window_minutes": 10,
    "min_samples": 20,
    "agreement_drop": 0.05,
    "unseen_intent_share": 0.2,
    "fallback_rate_rise": 0.15,
    "alpha": 0.01,
    "cooldown_minutes": 60,
}
KINDS = ("agree", "intent", "fallback", "healthy", "fresh", "late")
N = 40  # requests per agent and phase


def aid(kind: str) -> str:
    return f"dm-{kind}-{RUN}"


AGENTS = [aid(k) for k in KINDS]


@pytest.fixture(scope="module")
def dm_settings(broker, clickhouse, settings: Settings, stack_manager: ProcessManager, tmp_path_factory) -> Iterator:
    from tests.conftest import start_services

    agents_file = tmp_path_factory.mktemp("drift-agents") / "agents.yaml"
    agents_file.write_text(yaml.safe_dump({"agents": {a: {"drift": DRIFT} for a in AGENTS}}))
    svc = settings.model_copy(update={"agents_file": agents_file, "drift_check_interval_s": 1.0})
    start_services(stack_manager, svc, ("logger",))
    yield svc
    stack_manager.stop("drift_monitor")


# Records ----------------------------------------------------------------------------------------------------
def good(intent: str) -> str:
    return json.dumps({"intent": intent, "tool": TOOLS.get(intent, "none"), "arguments": {}, "reply": "Sure."})


def interaction(
    agent: str,
    when: datetime,
    route: str,
    *,
    teacher: str | None = None,
    student: str | None = None,
    client_intent: str | None = None,
    confidence: float = 0.95,
) -> Interaction:
    """route: shadow (student served, teacher in the background), confident (student only) or
    low_confidence (the student was unsure: the teacher served)."""
    t = Answer(content=good(teacher), model="reference/banking77", latency_ms=5) if teacher else None
    s = Answer(content=good(student), model="student", latency_ms=2, confidence=confidence) if student else None
    return Interaction(
        request_id=uuid.uuid4().hex,
        conversation_id=uuid.uuid4().hex,
        agent_id=agent,
        messages=[ChatMessage(role="user", content=f"request for {teacher or student or client_intent}")],
        intent=client_intent,
        teacher=t,
        student=s,
        served_by="teacher" if route == "low_confidence" else "student",
        route_reason="low_confidence" if route == "low_confidence" else "confident",
        shadow=route == "shadow",
        training_candidate=route == "low_confidence",
        lifecycle_stage="live",
        received_at=when,
        responded_at=when + timedelta(milliseconds=200),
    )


def spread(start: datetime, end: datetime, n: int = N) -> list[datetime]:
    return [start + (end - start) * (i / n) for i in range(n)]


def promotion(agent: str, at: datetime, version: int = 1, **metrics: float) -> ModelEvent:
    return ModelEvent(
        agent_id=agent,
        kind="promoted",
        model_name=f"student_{agent}",
        model_version=version,
        snapshot_id=f"ds-{agent}",
        metrics={"agreement": 0.95, **metrics},
        confidence_threshold=0.8 if "coverage" in metrics else None,
        lineage={"snapshot_id": f"ds-{agent}"},
        created_at=at,
    )


def snapshot(agent: str, at: datetime) -> DatasetSnapshot:
    return DatasetSnapshot(
        snapshot_id=f"ds-{agent}",
        agent_id=agent,
        version=1,
        content_hash=f"h-{agent}",
        uri=f"file:///ds/{agent}",
        split_counts={"train": 80, "holdout": 10},
        intent_counts=TRAINED,
        created_at=at,
    )


def world(now: datetime) -> tuple[list[Record], list[Record], list[Interaction]]:
    """(lifecycle events to publish first, the late agent's promotion, interactions)."""
    promoted_at, begin, end = now - timedelta(minutes=4), now - timedelta(minutes=3.5), now - timedelta(minutes=0.5)
    events: list[Record] = [snapshot(a, promoted_at - timedelta(minutes=5)) for a in AGENTS]
    rows: list[Interaction] = []
    intents = list(TRAINED)

    # Agreement drift: the student disagrees with the teacher on 24 of 40 shadow samples (0.40 vs 0.95).
    a = aid("agree")
    events.append(promotion(a, promoted_at))
    rows += [
        interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[(i + (i % 5 < 3)) % 3])
        for i, t in enumerate(spread(begin, end))
    ]
    # Intent shift: half the traffic asks about an intent the student never saw (labelled by the client).
    a = aid("intent")
    events.append(promotion(a, promoted_at))
    rows += [
        interaction(
            a, t, "confident", student="card_arrival", client_intent="crypto_wallet" if i % 2 else intents[i % 3]
        )
        for i, t in enumerate(spread(begin, end))
    ]
    # Fallback rise: calibrated at coverage 0.9 (10 % fallbacks expected), 60 % fall back.
    a = aid("fallback")
    events.append(promotion(a, promoted_at, coverage=0.9))
    rows += [
        interaction(a, t, "low_confidence", teacher=intents[i % 3], student=intents[i % 3], confidence=0.3)
        if i % 5 < 3
        else interaction(a, t, "confident", student=intents[i % 3])
        for i, t in enumerate(spread(begin, end))
    ]
    # Healthy: agreeing shadows, trained intents, fallbacks at the calibrated rate: every rule judges, none fires.
    a = aid("healthy")
    events.append(promotion(a, promoted_at, coverage=0.9))
    rows += [
        interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[i % 3])
        if i < 25
        else interaction(a, t, "low_confidence", teacher=intents[i % 3], student=intents[i % 3], confidence=0.3)
        if i % 4 == 0
        else interaction(a, t, "confident", student=intents[i % 3], client_intent=intents[i % 3])
        for i, t in enumerate(spread(begin, end, 45))
    ]
    # Fresh: the old student disagreed, then a new one was promoted: its window starts clean (10 requests since).
    a = aid("fresh")
    events += [promotion(a, promoted_at), promotion(a, now - timedelta(minutes=1.5), version=2)]
    rows += [
        interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[(i + 1) % 3])
        for i, t in enumerate(spread(begin, now - timedelta(minutes=2)))
    ]
    rows += [
        interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[(i + 1) % 3])
        for i, t in enumerate(spread(now - timedelta(minutes=1.4), end, 10))
    ]
    # Late: drifts like "agree", but its promotion is only announced after the monitor's restart.
    a = aid("late")
    late = promotion(a, promoted_at)
    rows += [
        interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[(i + 1) % 3])
        if i % 2
        else interaction(a, t, "shadow", teacher=intents[i % 3], student=intents[i % 3])
        for i, t in enumerate(spread(begin, end))
    ]
    return events, [late], rows


# Kafka and ClickHouse ---------------------------------------------------------------------------------------
async def publish(settings: Settings, records: list[Record]) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        publisher = Publisher(producer, AvroCodec())
        futures = []
        for r in records:
            topic = {Interaction: topics.INTERACTIONS, ModelEvent: topics.MODELS, DatasetSnapshot: topics.DATASETS}
            key = r.request_id if isinstance(r, Interaction) else r.agent_id
            futures.append(await publisher.send_nowait(topic[type(r)], r, key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def triggers(settings: Settings) -> list[RetrainTriggered]:
    """Every retrain trigger of this module's agents on flywheel.retrain, from its start to its end now."""
    codec = AvroCodec()
    consumer = create_consumer(settings, None)
    tp = TopicPartition(topics.RETRAIN.name, 0)
    await consumer.start()
    got: list[RetrainTriggered] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for messages in (await consumer.getmany(tp, timeout_ms=500)).values():
                for msg in messages:
                    with contextlib.suppress(DecodeError):
                        record = codec.decode(msg.value)
                        if isinstance(record, RetrainTriggered) and record.agent_id in AGENTS:
                            got.append(record)
    finally:
        await consumer.stop()
    return got


async def wait_for(check: Callable[[], object], what: str, timeout_s: float = 90.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


def count(settings: Settings, sql: str) -> int:
    ch = ch_client(settings)
    try:
        return int(ch.command(sql, parameters={"agents": AGENTS}))
    finally:
        ch.close()


def start_monitor(manager: ProcessManager, settings: Settings) -> None:
    from tests.conftest import start_services

    start_services(manager, settings, ("drift_monitor",))


def sigkill(manager: ProcessManager, name: str) -> None:
    pid = manager.running_pid(name)
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def by_agent(got: list[RetrainTriggered]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in got:
        out.setdefault(t.agent_id, []).append(t.reason)
    return out


# The test ---------------------------------------------------------------------------------------------------
async def test_one_trigger_per_drift_none_in_cooldown_nor_for_healthy_traffic(
    dm_settings: Settings, stack_manager: ProcessManager
) -> None:
    now = utcnow()
    events, late, rows = world(now)
    await publish(dm_settings, events + rows)
    # Through the logger into ClickHouse: the monitor reads the lifecycle from there at start.
    in_list = "has({agents:Array(String)}, agent_id)"
    await wait_for(
        lambda: count(dm_settings, f"SELECT count() FROM interactions WHERE {in_list}") == len(rows),
        "every interaction in ClickHouse",
    )
    await wait_for(
        lambda: count(dm_settings, f"SELECT count() FROM model_events WHERE {in_list}") == 6,
        "the promotions in ClickHouse",
    )
    await wait_for(
        lambda: count(dm_settings, f"SELECT count() FROM datasets WHERE {in_list}") == len(AGENTS),
        "the snapshots in ClickHouse",
    )

    start_monitor(stack_manager, dm_settings)
    expected = {aid("agree"): ["agreement_drift"], aid("intent"): ["intent_shift"], aid("fallback"): ["fallback_rate"]}
    await wait_for(lambda: _has(dm_settings, 3), "three retrain triggers", timeout_s=60)
    await asyncio.sleep(4)  # several more checks: still one trigger per drift
    got = await triggers(dm_settings)
    assert by_agent(got) == expected

    evidence = {t.agent_id: json.loads(t.evidence) for t in got}
    agree = evidence[aid("agree")]
    assert agree["rule"] == "agreement_drift"
    assert agree["window"]["start"] == (now - timedelta(minutes=4)).isoformat()  # clipped at the promotion
    assert datetime.fromisoformat(agree["window"]["end"]) > now
    figures = agree["figures"]
    assert (figures["samples"], figures["hits"], figures["observed"]) == (40, 16, 0.4)
    assert figures["reference"] == 0.95 and figures["limit"] == pytest.approx(0.9) and figures["p_value"] < 1e-9
    assert figures["test"].startswith("exact binomial") and figures["statistic"] < -5
    assert "shadow" in agree["query"]["sql"] and agree["query"]["parameters"]["agent"] == aid("agree")
    assert agree["model"]["version"] == 1 and agree["model"]["snapshot_id"] == f"ds-{aid('agree')}"
    assert set(agree["rules"]) == {"agreement_drift", "intent_shift", "fallback_rate"}

    intent = evidence[aid("intent")]["figures"]
    assert (intent["samples"], intent["hits"], intent["observed"]) == (40, 20, 0.5)
    assert intent["unseen_intents"] == {"crypto_wallet": 20} and intent["p_value"] < 0.01
    assert "intent_labels" in evidence[aid("intent")]["query"]["sql"]
    fallback = evidence[aid("fallback")]["figures"]
    assert (fallback["samples"], fallback["hits"], fallback["observed"]) == (40, 24, 0.6)
    assert fallback["reference"] == pytest.approx(0.1) and fallback["reference_source"] == "calibration"
    assert evidence[aid("fallback")]["rules"]["agreement_drift"]["why"].startswith("0 shadow samples")

    # The logger writes the triggers to ClickHouse: the durable record the cool-down is derived from.
    await wait_for(
        lambda: count(dm_settings, f"SELECT count() FROM retrain_events WHERE {in_list}") == 3,
        "the triggers in retrain_events",
    )
    # Each retrain is rejected: the old students serve on (stage live again) and their drift is still there,
    # but the cool-down holds, in the running monitor ...
    rejected = [ModelEvent(agent_id=a, kind="rejected", model_name=f"student_{a}") for a in expected]
    await publish(dm_settings, rejected)
    await asyncio.sleep(5)
    assert by_agent(await triggers(dm_settings)) == expected
    # ... and after a SIGKILL and a restart (the state comes back from ClickHouse and the topics).
    sigkill(stack_manager, "drift_monitor")
    start_monitor(stack_manager, dm_settings)
    await asyncio.sleep(5)
    assert by_agent(await triggers(dm_settings)) == expected

    # The restarted monitor does check: a student promoted now, drifting, is triggered for at once.
    await publish(dm_settings, late)
    await wait_for(lambda: _has(dm_settings, 4), "the late agent's trigger", timeout_s=60)
    await asyncio.sleep(3)
    assert by_agent(await triggers(dm_settings)) == {**expected, aid("late"): ["agreement_drift"]}

    # SIGTERM: a clean stop, the ready file cleared.
    log = stack_manager.log_file("drift_monitor")
    assert stack_manager.stop("drift_monitor")
    assert "drift: stopped;" in log.read_text()
    assert not (dm_settings.run_dir / "drift_monitor.ready").exists()


async def _has(settings: Settings, n: int) -> bool:
    return len(await triggers(settings)) >= n
