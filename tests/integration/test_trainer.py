"""The trainer on the local stack: a tiny model trained for a few steps on a small snapshot, evaluated, gated,
published to Triton (promoted) or not (rejected), events on flywheel.models; then models / rollback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.core import topics
from services.core.agents import AgentConfig, AgentsFile, Distillation, Validation
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.lifecycle import fold
from services.core.model_repository import ModelRepository, student_model_name
from services.core.records import DatasetSnapshot, ModelEvent
from services.core.settings import Settings
from services.logger.rows import MODEL_EVENTS
from services.student_runtime import StudentGenerator
from services.trainer.data import read_snapshot
from services.trainer.fixtures import build_snapshot
from services.trainer.models import RollbackError, versions_from_events
from services.trainer.pipeline import JobOptions
from services.trainer.service import Trainer, models_text, rollback_and_emit, train_snapshot
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.integration
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
OPTIONS = JobOptions(max_steps=3)


def lax() -> Validation:
    # The config refuses thresholds of 0 (gt=0); built without validation so the tiny model's noise passes.
    values = {**Validation().model_dump(), "quality_threshold": 0.0, "format_threshold": 0.0, "served_agreement": 0.0}
    return Validation.model_construct(**values)


def agent(agent_id: str, base: Path, validation: Validation, **distillation) -> AgentConfig:
    dist = Distillation(
        base_model=str(base), epochs=1, batch_size=4, learning_rate=1e-2, max_seq_len=192, **distillation
    )
    return AgentConfig(agent_id=agent_id, distillation=dist, validation=validation)


@pytest.fixture(scope="module")
def stack(settings: Settings, broker, clickhouse, triton) -> Settings:
    from services.stack.init import initialise

    initialise(settings)  # topics and migrations (idempotent)
    return settings


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("trainer-tiny"))


@pytest.fixture(scope="module")
def repo(stack: Settings) -> ModelRepository:
    return ModelRepository.from_settings(stack, load_timeout_s=180.0)


def snapshot_for(settings: Settings, agent_id: str, seed: int = 0) -> Path:
    return build_snapshot(settings.path("artifacts"), agent_id, DATA_DIR, intents=3, per_intent=6, seed=seed)


async def model_events(settings: Settings, agent_id: str, until: str, timeout_s: float = 120.0) -> list[ModelEvent]:
    codec = AvroCodec()
    consumer = create_consumer(settings, None, topics.MODELS.name)
    await consumer.start()
    got: list[ModelEvent] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not any(e.kind == until for e in got):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for msg in messages:
                        try:
                            event = codec.decode(msg.value, ModelEvent)
                        except DecodeError:
                            continue  # other tests put deliberately broken records on the shared topic
                        if event.agent_id == agent_id:
                            got.append(event)
    finally:
        await consumer.stop()
    return got


async def run_trainer_on(
    stack: Settings, trainer: Trainer, record: DatasetSnapshot, until: str
) -> tuple[list[ModelEvent], asyncio.Future]:
    """Run the trainer service, send it one snapshot, and return its model events up to `until` (and the
    service's task, stopped)."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(trainer.run(stop))
    producer = create_producer(stack)
    await producer.start()
    try:
        await Publisher(producer, AvroCodec()).send(topics.DATASETS, record, record.agent_id)
        events = await model_events(stack, record.agent_id, until)
    finally:
        stop.set()
        await producer.stop()
        await asyncio.wait_for(task, 60)
    return events, task


async def test_service_trains_gates_publishes_and_announces(stack: Settings, tiny_base: Path, repo: ModelRepository):
    agent_id = "trainer-pass"
    folder = snapshot_for(stack, agent_id)
    snap = read_snapshot(folder)
    agents = AgentsFile(agents={agent_id: agent(agent_id, tiny_base, lax())})
    record = DatasetSnapshot(
        snapshot_id=snap.snapshot_id, agent_id=agent_id, version=1, content_hash="x", uri=str(folder)
    )
    events, _ = await run_trainer_on(stack, Trainer(stack, OPTIONS, agents=agents), record, "promoted")
    assert [e.kind for e in events] == ["candidate", "promoted"]
    promoted = events[-1]
    assert promoted.gate is not None and promoted.gate.passed and promoted.gate.mode == "overall"
    assert promoted.snapshot_id == snap.snapshot_id and promoted.base_model == str(tiny_base)
    assert {"agreement", "format_compliance", "coverage", "latency_p95_ms", "train_seconds"} <= set(promoted.metrics)
    assert {"snapshot_id", "base_model", "config_hash", "code_version"} <= set(promoted.lineage)
    model = student_model_name(agent_id)
    assert promoted.model_version in repo.served_versions(model)
    # The new version answers, with the constrained labels and the trained system prompt in its spec.
    text, confidence = repo.probe(model, promoted.model_version, json.dumps(snap.holdout[0].messages))
    assert 0.0 <= confidence <= 1.0 and isinstance(text, str)
    spec = json.loads((repo.model_dir(model) / str(promoted.model_version) / "spec.json").read_text())
    assert (
        spec["labels"]
        and spec["label_prefix"] == '{"intent": "'
        and (repo.model_dir(model) / str(promoted.model_version) / "adapter" / "adapter_config.json").is_file()
    )


async def test_a_job_that_cannot_finish_emits_failed_with_its_error_and_the_trainer_goes_on(
    stack: Settings, tiny_base: Path
) -> None:
    agent_id = "trainer-broken"
    agents = AgentsFile(agents={agent_id: agent(agent_id, tiny_base, lax())})
    trainer = Trainer(stack, OPTIONS, agents=agents)
    missing = stack.path("artifacts") / "no-such-snapshot"
    record = DatasetSnapshot(snapshot_id="ds-missing", agent_id=agent_id, version=1, content_hash="x", uri=str(missing))
    events, task = await run_trainer_on(stack, trainer, record, "failed")
    assert [e.kind for e in events] == ["failed"]
    failed = events[0]
    assert failed.snapshot_id == "ds-missing" and str(missing) in (failed.error or "")
    assert not task.exception() and trainer.jobs == 1  # the trainer went on
    # The agent left `training`: back to the grace period, with the failure on record.
    life = fold(agent_id, [record, failed])
    assert life.stage == "grace" and life.last_failure and "ds-missing" in life.last_failure


def test_a_student_with_a_label_head_is_trained_published_and_served(
    stack: Settings, tiny_base: Path, repo: ModelRepository
) -> None:
    agent_id = "trainer-head"
    folder = snapshot_for(stack, agent_id)
    snap = read_snapshot(folder)
    emitted: list[ModelEvent] = []
    cfg = agent(agent_id, tiny_base, lax(), label_head=True)
    final = train_snapshot(stack, cfg, str(folder), emitted.append, OPTIONS, repo)
    assert final.kind == "promoted", final
    version = repo.model_dir(student_model_name(agent_id)) / str(final.model_version)
    spec = json.loads((version / "spec.json").read_text())
    # The head travels beside the adapter, its rows in the order of the spec's labels.
    assert spec["label_head"] == "label_head.safetensors"
    assert (version / "adapter" / "label_head.safetensors").is_file()
    served = StudentGenerator(spec, version)
    assert served.label_head is not None and served.tail_decision
    # Triton loaded it (a version whose head cannot load is not served) and answers.
    prompt = json.dumps(snap.holdout[0].messages)
    text, confidence = repo.probe(student_model_name(agent_id), final.model_version, prompt)
    assert isinstance(text, str) and 0.0 <= confidence <= 1.0


def test_a_failing_gate_rejects_with_reasons_and_publishes_nothing(
    stack: Settings, tiny_base: Path, repo: ModelRepository
) -> None:
    agent_id = "trainer-fail"
    folder = snapshot_for(stack, agent_id)
    emitted: list[ModelEvent] = []
    cfg = agent(agent_id, tiny_base, Validation(quality_threshold=0.92, format_threshold=0.95))
    final = train_snapshot(stack, cfg, str(folder), emitted.append, OPTIONS, repo)
    assert [e.kind for e in emitted] == ["candidate", "rejected"] and final is emitted[-1]
    assert final.gate is not None and not final.gate.passed
    assert any(r.startswith("agreement ") and "(quality_threshold)" in r for r in final.gate.reasons)
    assert any(r.startswith("format_compliance ") for r in final.gate.reasons)
    assert final.model_version is None and "agreement" in final.metrics
    assert repo.versions(student_model_name(agent_id)) == []


async def test_models_lists_versions_and_rollback_serves_an_earlier_one(
    stack: Settings, tiny_base: Path, repo: ModelRepository
) -> None:
    from services.core.clickhouse import client

    agent_id = "trainer-rollback"
    cfg = agent(agent_id, tiny_base, lax())
    events: list[ModelEvent] = []
    for seed in (1, 2):
        train_snapshot(stack, cfg, str(snapshot_for(stack, agent_id, seed)), events.append, OPTIONS, repo)
    ch = client(stack)
    try:
        # What the logger writes from flywheel.models (it is not running in this test).
        ch.insert(MODEL_EVENTS.table, [MODEL_EVENTS.row(e) for e in events], column_names=list(MODEL_EVENTS.columns))
    finally:
        ch.close()
    promoted = [e for e in events if e.kind == "promoted"]
    assert [e.model_version for e in promoted] == [1, 2]
    text = models_text(stack, agent_id)
    assert "student_trainer-rollback" in text and "*    2 promoted" in text

    event = await rollback_and_emit(stack, agent_id)
    assert event.kind == "rolled_back" and event.model_version == 3
    assert event.lineage["rolled_back_to"] == "1" and event.metrics == promoted[0].metrics
    model = student_model_name(agent_id)
    assert repo.served_versions(model) == [3]
    spec_1 = json.loads((repo.model_dir(model) / "1" / "spec.json").read_text())
    spec_3 = json.loads((repo.model_dir(model) / "3" / "spec.json").read_text())
    assert spec_3["metadata"] == spec_1["metadata"]
    got = await model_events(stack, agent_id, "rolled_back")
    assert got[-1].event_id == event.event_id
    rows = versions_from_events([{**event_dict(e)} for e in [*promoted, event]])
    assert rows[-1].serving and rows[-1].version == 3
    with pytest.raises(RollbackError, match="never promoted"):
        await rollback_and_emit(stack, agent_id, 7)


def event_dict(event: ModelEvent) -> dict:
    return dict(zip(MODEL_EVENTS.columns, MODEL_EVENTS.row(event), strict=True))


def test_a_warm_started_retrain_continues_from_the_served_version(
    stack: Settings, tiny_base: Path, repo: ModelRepository
) -> None:
    agent_id = "trainer-warm"
    cfg = agent(agent_id, tiny_base, lax(), label_head=True, warm_start=True, warm_start_epochs=0.5)
    first = train_snapshot(stack, cfg, str(snapshot_for(stack, agent_id, 1)), lambda _e: None, OPTIONS, repo)
    served = repo.model_dir(student_model_name(agent_id)) / str(first.model_version)
    second = train_snapshot(stack, cfg, str(snapshot_for(stack, agent_id, 2)), lambda _e: None, OPTIONS, repo)
    assert (first.kind, second.kind) == ("promoted", "promoted")
    runs = (stack.path("artifacts") / "runs" / agent_id).glob("*/report.json")
    reports = sorted(runs, key=lambda r: r.parent.name.rsplit("-", 1)[-1])  # by the run's time stamp
    assert [json.loads(r.read_text())["warm_start"] for r in reports] == [None, str(served)]
    prompt = json.dumps(read_snapshot(snapshot_for(stack, agent_id, 3)).holdout[0].messages)
    text, _confidence = repo.probe(student_model_name(agent_id), second.model_version, prompt)
    assert isinstance(text, str)
