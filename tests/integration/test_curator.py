"""The curator on the local stack: interactions in ClickHouse -> intent labels -> grace complete ->
a content-addressed snapshot in the artifact store -> DatasetSnapshot on flywheel.datasets."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import pytest
import yaml

from services.core import topics
from services.core.agents import load_agents
from services.core.clickhouse import client as ch_client
from services.core.codec import AvroCodec
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.records import Answer, ChatMessage, DatasetSnapshot, Interaction, RetrainTriggered, utcnow
from services.core.settings import Settings
from services.curator.labelling import Embedder
from services.curator.service import Curator, grace_progress
from services.curator.snapshot import read_snapshot
from services.logger.rows import INTERACTION_COLUMNS, interaction_row

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
TOOLS = {"card_arrival": "card_delivery_status", "exchange_rate": "exchange_rates", "lost_or_stolen_card": "card_block"}
TEXTS = {
    "card_arrival": [
        "Where is my new card?",
        "My card still has not arrived",
        "When will my card come?",
        "How long until the card is delivered?",
        "Is my card on its way?",
        "card not here yet",
    ],
    "exchange_rate": [
        "What is the exchange rate for euros?",
        "How much is a dollar in pounds?",
        "Which rate do you use to convert currency?",
        "tell me today's rate for yen",
    ],
    "lost_or_stolen_card": ["I lost my card", "Someone stole my wallet with my card", "my card is missing"],
}


def aid(name: str) -> str:
    return f"cur-{name}-{RUN}"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def cur_settings(broker, clickhouse, settings: Settings, tmp_path_factory) -> Settings:
    agents_file = tmp_path_factory.mktemp("curator-agents") / "agents.yaml"
    base = {
        "grace_period": {"min_conversations": 12, "min_unique_intents": 3, "max_duration_days": 14},
        "validation": {"holdout_fraction": 0.2},
        "curation": {"few_shot_examples": 2},
        "output": {"valid_tools": sorted(TOOLS.values())},
    }
    agents = {aid("main"): base, aid("svc"): base, aid("young"): {**base, "grace_period": {"min_conversations": 500}}}
    agents_file.write_text(yaml.safe_dump({"agents": agents}))
    return settings.model_copy(update={"agents_file": agents_file})


def interaction(
    agent: str,
    text: str,
    intent: str | None,
    content: str | None,
    *,
    error: str | None = None,
    client_intent: str | None = None,
    teacher: bool = True,
    minutes_ago: float = 60,
) -> Interaction:
    when = utcnow() - timedelta(minutes=minutes_ago)
    answer = Answer(content=content, model="reference/banking77", latency_ms=5, error=error) if teacher else None
    student = None if teacher else Answer(content="{}", model="student", latency_ms=1, confidence=0.9)
    return Interaction(
        request_id=uuid.uuid4().hex,
        conversation_id=uuid.uuid4().hex,
        agent_id=agent,
        messages=[ChatMessage(role="user", content=text)],
        intent=client_intent,
        metadata={"gold_intent": intent} if intent else {},
        teacher=answer,
        student=student,
        served_by="teacher" if teacher else "student",
        route_reason="grace_period" if teacher else "confident",
        training_candidate=teacher and error is None,
        received_at=when,
        responded_at=when + timedelta(milliseconds=300),
    )


def good(intent: str, reply: str = "Let me check that for you.") -> str:
    return json.dumps({"intent": intent, "tool": TOOLS[intent], "arguments": {}, "reply": reply})


def seed(settings: Settings, agent: str) -> list[Interaction]:
    recs = [interaction(agent, t, i, good(i)) for i, texts in TEXTS.items() for t in texts]
    recs += [
        interaction(agent, "Where is my new card?", "card_arrival", good("card_arrival")),  # duplicate input
        interaction(agent, "is my card lost?", "card_arrival", good("card_arrival", "I'm not sure about that.")),
        interaction(
            agent,
            "block it",
            "lost_or_stolen_card",
            json.dumps({"intent": "lost_or_stolen_card", "tool": "teleport", "arguments": {}, "reply": "ok"}),
        ),
        interaction(agent, "rate please", "exchange_rate", '{"intent": "exch'),
        interaction(agent, "hello?", None, None, error="teacher timed out"),
        interaction(agent, "   ", "card_arrival", good("card_arrival")),
        interaction(agent, "my card arrived", None, good("card_arrival"), client_intent="card_arrival"),
        # Served by the student, no label, no teacher answer: needs a cluster.
        interaction(agent, "Do you support crypto wallets?", None, None, teacher=False),
        interaction(agent, "Can I hold bitcoin in my account?", None, None, teacher=False),
    ]
    ch = ch_client(settings)
    try:
        ch.insert("interactions", [interaction_row(r) for r in recs], column_names=list(INTERACTION_COLUMNS))
    finally:
        ch.close()
    return recs


async def read_topic(settings: Settings, topic: str, agent: str, want: int, timeout_s: float = 20) -> list:
    codec = AvroCodec()
    consumer = create_consumer(settings, None, topic)
    await consumer.start()
    got = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(got) < want and asyncio.get_running_loop().time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got += [r for r in (codec.decode(m.value) for m in msgs) if r.agent_id == agent]
    finally:
        await consumer.stop()
    return got


async def test_grace_labels_and_snapshot(cur_settings: Settings, embedder: Embedder) -> None:
    agent = aid("main")
    seed(cur_settings, agent)
    curator = Curator(cur_settings, load_agents(cur_settings.agents_file), embedder=embedder)
    ch = ch_client(cur_settings)
    producer = create_producer(cur_settings)
    await producer.start()
    curator.publisher = Publisher(producer, AvroCodec())
    try:
        curator.load_history(ch)
        out = await asyncio.to_thread(curator.step, ch)
        await curator.publish(out)
        mine = [r for r in out if r.agent_id == agent]
        assert [type(r) for r in mine] == [RetrainTriggered, DatasetSnapshot]
        trigger, snap = mine
        evidence = json.loads(trigger.evidence)
        assert trigger.reason == "grace_complete" and evidence["reason"] == "minimums_met"
        assert evidence["conversations"] == 22 and evidence["unique_intents"] >= 4  # 3 intents + a cluster

        # Exactly once: a second round owes this agent nothing.
        assert [r for r in await asyncio.to_thread(curator.step, ch) if r.agent_id == agent] == []

        sources = dict(
            ch.query(
                "SELECT source, count() FROM intent_labels FINAL WHERE agent_id = {a:String} GROUP BY source",
                parameters={"a": agent},
            ).result_rows
        )
        # clusters: the two student-only requests, the teacher's error, the broken JSON answer
        assert sources["teacher"] >= 13 and sources["client"] == 1 and sources["cluster"] == 4
        clusters = ch.query(
            "SELECT DISTINCT intent FROM intent_labels FINAL WHERE agent_id = {a:String} AND source = 'cluster'",
            parameters={"a": agent},
        ).result_rows
        assert all(c[0].startswith("cluster_") or c[0] in TOOLS for c in clusters)
        view = ch.query(
            "SELECT countIf(intent IS NULL) FROM interaction_intents WHERE agent_id = {a:String}",
            parameters={"a": agent},
        ).result_rows[0][0]
        assert view == 0  # every interaction has an effective intent
    finally:
        await producer.stop()
        ch.close()

    stats = snap.filter_stats
    assert stats["candidates"] == 20  # every teacher-answered request (the two student-only ones are not)
    assert (stats["teacher_error"], stats["hedging"], stats["invalid_tool"], stats["unparseable"]) == (1, 1, 1, 1)
    assert stats["empty_input"] == 1 and stats["exact_duplicate"] >= 1
    assert snap.split_counts["train"] + snap.split_counts["holdout"] == stats["kept"]
    assert snap.split_counts["holdout"] >= 2 and snap.parent_snapshot_id is None and snap.version == 1
    folder = cur_settings.path("artifacts") / "datasets" / agent / snap.snapshot_id
    train, holdout, prompt, manifest = read_snapshot(folder)
    assert len(train) == snap.split_counts["train"] and manifest["snapshot_id"] == snap.snapshot_id
    assert all(json.loads(r["target"])["tool"] in TOOLS.values() for r in train + holdout)
    assert all(r["gold"] in (r["intent"], None) for r in train + holdout)
    assert sum(r["gold"] is None for r in train + holdout) == 1  # the client-labelled one has no gold label
    assert len(prompt.few_shot) == 2 and "Tools:" in prompt.system_prompt
    assert manifest["source_query"].lstrip().startswith("SELECT") and manifest["filter_stats"] == stats

    events = await read_topic(cur_settings, topics.DATASETS.name, agent, 1)
    assert [e.snapshot_id for e in events] == [snap.snapshot_id]
    retrains = await read_topic(cur_settings, topics.RETRAIN.name, agent, 1)
    assert [e.event_id for e in retrains] == [trigger.event_id]

    progress = {s.agent_id: s for s in grace_progress(cur_settings)}
    assert progress[agent].complete
    young = progress[aid("young")]
    assert not young.complete and young.describe().startswith(f"{aid('young')}: grace 0/500 conversations")


async def test_service_runs_and_stops(cur_settings: Settings, embedder: Embedder) -> None:
    agent = aid("svc")
    seed(cur_settings, agent)
    curator = Curator(cur_settings, load_agents(cur_settings.agents_file), embedder=embedder, check_interval_s=0.5)
    stop = asyncio.Event()
    task = asyncio.ensure_future(curator.run(stop))
    folder = cur_settings.path("artifacts") / "datasets" / agent
    for _ in range(120):
        if folder.is_dir() and any(p.name.startswith("ds-") for p in folder.iterdir()):
            break
        await asyncio.sleep(0.25)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert curator.stats["emitted_retrain_triggered"] >= 1 and curator.stats["emitted_dataset_snapshot"] >= 1
    events = await read_topic(cur_settings, topics.DATASETS.name, agent, 1)
    assert len(events) == 1 and events[0].trigger_reason == "grace_complete"
