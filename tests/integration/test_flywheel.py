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
                        "validation": {"quality_threshold": 0.0, "format_threshold": 0.0},
                        "routing": {"canary_steps": [1.0], "shadow_rate": 0.0},
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
