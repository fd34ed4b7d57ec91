"""The distillation path end to end on the real local stack, every service a process as `flywheel up` runs
them: traffic through the router (the reference teacher answers) → interactions in ClickHouse → the
curator sees the grace period complete → snapshot → the trainer trains a tiny model, gates and publishes
it → a new Triton version serving → the router switches the agent to the student."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import yaml

from services.client import FlywheelClient
from services.core import topics
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import create_consumer
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered
from services.core.settings import Settings
from services.teacher.workloads import load_workload
from services.workload import replay, to_request
from tests.helpers.tiny_model import LAX_VALIDATION

pytestmark = pytest.mark.integration

AGENT = f"flywheel-{uuid.uuid4().hex[:6]}"
INTENTS = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"]


@pytest.fixture(scope="module")
def flywheel(broker, clickhouse, triton, teacher, settings: Settings, stack_manager, tmp_path_factory):
    from tests.conftest import start_services
    from tests.helpers.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("flywheel-base"))
    agents_file = tmp_path_factory.mktemp("flywheel-agents") / "agents.yaml"
    agents_file.write_text(
        yaml.safe_dump(
            {
                "agents": {
                    AGENT: {
                        "teacher": {"model": "reference/banking77"},
                        "grace_period": {"min_conversations": 40, "min_unique_intents": 4},
                        "distillation": {
                            "base_model": str(base),
                            "epochs": 1,
                            "learning_rate": 0.001,
                            "max_train_examples": 48,
                            "max_seq_len": 128,
                        },
                        # A tiny random model cannot agree with the teacher: the gate is opened so the test
                        # follows the promotion path; the gate's decisions have their own tests.
                        "validation": LAX_VALIDATION,
                        # The teacher shadows every student answer: its answers are the retrain test's new
                        # training data whatever the tiny student's confidence.
                        "routing": {"canary_steps": [1.0], "shadow_rate": 1.0},
                    }
                }
            }
        )
    )
    svc = settings.model_copy(update={"agents_file": agents_file, "curator_check_interval_s": 1.0})
    start_services(stack_manager, svc, ("logger", "router", "curator", "trainer"))
    yield svc
    for name in ("curator", "trainer"):
        stack_manager.stop(name)


async def lifecycle_events(settings: Settings, until_kind: str, timeout_s: float) -> list:
    codec = AvroCodec()
    consumer = create_consumer(settings, None, topics.RETRAIN.name, topics.DATASETS.name, topics.MODELS.name)
    await consumer.start()
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for msg in messages:
                    try:
                        record = codec.decode(msg.value)
                    except DecodeError:
                        continue
                    if getattr(record, "agent_id", None) == AGENT:
                        got.append(record)
            if any(isinstance(e, ModelEvent) and e.kind in (until_kind, "rejected") for e in got):
                return got
    finally:
        await consumer.stop()
    raise AssertionError(
        f"{AGENT}: no {until_kind} event within {timeout_s:.0f}s; saw {[type(e).__name__ for e in got]}"
    )


async def test_grace_snapshot_training_promotion_and_the_switch_to_the_student(flywheel: Settings) -> None:
    result = await replay(flywheel, AGENT, count=48, rate=None, intents=INTENTS, seed=11)
    assert result.answered == 48 and result.served_by == {"teacher": 48}

    events = await lifecycle_events(flywheel, "promoted", timeout_s=300)
    kinds = [(type(e).__name__, getattr(e, "reason", getattr(e, "kind", ""))) for e in events]
    assert ("RetrainTriggered", "grace_complete") in kinds, kinds
    snapshot = next(e for e in events if isinstance(e, DatasetSnapshot))
    assert snapshot.split_counts["train"] > 0 and snapshot.split_counts["holdout"] > 0
    assert Path(snapshot.uri, "train.jsonl").is_file()
    retrain = next(e for e in events if isinstance(e, RetrainTriggered))
    assert retrain.created_at <= snapshot.created_at
    promoted = next(e for e in events if isinstance(e, ModelEvent) and e.kind == "promoted")
    assert promoted.snapshot_id == snapshot.snapshot_id and promoted.model_version
    assert promoted.gate is not None and promoted.gate.passed

    # The router follows flywheel.models: the agent is now live on its student.
    await asyncio.sleep(2)
    workload = load_workload("banking77", flywheel.data_dir)
    examples = [e for e in workload.examples("test") if e.intent in INTENTS][:6]
    async with FlywheelClient(flywheel) as client:
        responses = [await client.submit(to_request(e, AGENT, label=False)) for e in examples]
    assert all(r.error is None for r in responses)
    # The student answered every request (a low-confidence answer is then served by the teacher, by design).
    from services.core.clickhouse import client as ch_client

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ch = ch_client(flywheel)
        try:
            rows = ch.query(
                "SELECT lifecycle_stage, student_ran, student_model_version FROM interactions "
                "WHERE agent_id = {a:String} AND lifecycle_stage = 'live'",
                parameters={"a": AGENT},
            ).result_rows
        finally:
            ch.close()
        if len(rows) >= len(examples):
            break
        await asyncio.sleep(0.5)
    assert len(rows) == len(examples)
    assert all(ran and version == str(promoted.model_version) for _, ran, version in rows), rows


NEW_INTENTS = ["card_swallowed", "atm_support"]


async def _served_versions(settings: Settings, since_ms: int) -> list[tuple[str, str]]:
    from services.core.clickhouse import client as ch_client

    ch = ch_client(settings)
    try:
        return ch.query(
            "SELECT route_reason, student_model_version FROM interactions FINAL WHERE agent_id = {a:String} "
            "AND student_ran AND toUnixTimestamp64Milli(received_at) >= {t:Int64}",
            parameters={"a": AGENT, "t": since_ms},
        ).result_rows
    finally:
        ch.close()


async def _retrain(settings: Settings, reason: str) -> RetrainTriggered:
    from services.core.kafka import Publisher, create_producer

    trigger = RetrainTriggered(agent_id=AGENT, reason=reason, evidence='{"source": "test"}')  # type: ignore[arg-type]
    producer = create_producer(settings)
    await producer.start()
    try:
        await Publisher(producer, AvroCodec()).send(topics.RETRAIN, trigger, AGENT)
    finally:
        await producer.stop()
    return trigger


async def _events_after(settings: Settings, trigger: RetrainTriggered, until_kind: str, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        events = await lifecycle_events(settings, until_kind, timeout_s=max(1.0, deadline - time.monotonic()))
        after = [e for e in events if e.created_at >= trigger.created_at and not isinstance(e, RetrainTriggered)]
        if any(isinstance(e, ModelEvent) and e.kind in (until_kind, "rejected") for e in after):
            return after
        await asyncio.sleep(1)


async def test_a_retrain_learns_the_new_traffic_and_a_rejected_candidate_leaves_the_student_serving(
    flywheel: Settings,
) -> None:
    """After the drift monitor (here: the trigger it would emit) asks for a retrain, the curator builds a new
    snapshot over everything since, the fallbacks' teacher answers on the new intents included; the trainer
    promotes a new version the router switches to. A candidate that fails the gate changes nothing."""
    first = await lifecycle_events(flywheel, "promoted", timeout_s=60)
    v1 = next(e for e in first if isinstance(e, ModelEvent) and e.kind == "promoted")
    # New intents arrive; the tiny student is unsure of them, so the teacher answers (training data).
    t_ms = int(time.time() * 1000)
    result = await replay(flywheel, AGENT, count=24, rate=None, intents=NEW_INTENTS, split="test", seed=23)
    assert result.answered == 24
    deadline = time.monotonic() + 60
    while len(rows := await _served_versions(flywheel, t_ms)) < 24 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the logger's flush
    assert len(rows) == 24, rows

    trigger = await _retrain(flywheel, "intent_shift")
    after = await _events_after(flywheel, trigger, "promoted", timeout_s=300)
    snapshot = next(e for e in after if isinstance(e, DatasetSnapshot))
    assert snapshot.trigger_reason == "intent_shift" and snapshot.parent_snapshot_id == v1.snapshot_id
    assert set(NEW_INTENTS) & set(snapshot.intent_counts), snapshot.intent_counts
    v2 = next(e for e in after if isinstance(e, ModelEvent) and e.kind == "promoted")
    assert v2.snapshot_id == snapshot.snapshot_id and v2.model_version and v2.model_version > (v1.model_version or 0)

    # The router follows the promotion.
    await asyncio.sleep(2)
    t_ms = int(time.time() * 1000)
    await replay(flywheel, AGENT, count=4, rate=None, intents=INTENTS, split="test", seed=29)
    await asyncio.sleep(3)
    rows = await _served_versions(flywheel, t_ms)
    assert rows and all(version == str(v2.model_version) for _, version in rows), rows

    # A candidate that fails the gate: the trainer re-reads agents.yaml for every job.
    config = yaml.safe_load(flywheel.agents_file.read_text())
    config["agents"][AGENT]["validation"] = {"quality_threshold": 1.0, "format_threshold": 1.0}
    flywheel.agents_file.write_text(yaml.safe_dump(config))
    t_ms = int(time.time() * 1000)
    await replay(flywheel, AGENT, count=8, rate=None, intents=NEW_INTENTS, split="test", seed=31)
    deadline = time.monotonic() + 60
    while len(await _served_versions(flywheel, t_ms)) < 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    trigger = await _retrain(flywheel, "manual")
    after = await _events_after(flywheel, trigger, "promoted", timeout_s=300)
    verdicts = [e for e in after if isinstance(e, ModelEvent) and e.kind in ("promoted", "rejected")]
    assert [e.kind for e in verdicts] == ["rejected"], verdicts
    assert verdicts[0].gate is not None and not verdicts[0].gate.passed
    t_ms = int(time.time() * 1000)
    await replay(flywheel, AGENT, count=4, rate=None, intents=INTENTS, split="test", seed=37)
    await asyncio.sleep(3)
    rows = await _served_versions(flywheel, t_ms)
    assert rows and all(version == str(v2.model_version) for _, version in rows), rows
