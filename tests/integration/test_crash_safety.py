"""Crash safety on the real local stack: every service is SIGKILLed in turn while BANKING77 traffic flows
through the router, then restarted; nothing is lost, nothing is duplicated, the lifecycle is intact.

Three agents share the run:

* ``LIVE`` has a promoted student, seeded straight into ClickHouse's lifecycle tables (the durable record
  every service rebuilds its state from at start); it is pinned to the teacher (``mode: teacher``), so no
  student has to be served for it. Its folded lifecycle is recorded before the kills and must be equal after.
* ``FIRST`` and ``SECOND`` start in their grace period; the traffic completes it, the curator snapshots them,
  and the trainer trains a tiny model for each. The trainer is killed while idle early on and stays down
  until both snapshots exist, so that it reads both in one batch; it is then killed again while training the
  second one: after the restart it must finish that job, and must not train the first one again (its
  verdict is given, though the batch's offsets were not committed).

What is checked, in ClickHouse: every request id the client sent is stored exactly once (plain ``count()``,
``uniqExact(request_id)`` and the id sets; see ``check_interactions`` for why not ``FINAL``), every request
got an answer, and for the distilled agents exactly one retrain trigger, one snapshot and one verdict each,
no event stored twice, and one Triton version each.

Most of the run time (3 to 5 minutes on 2 busy cores) is the trainer's two and a half tiny jobs: importing
torch in each new trainer process, and Triton loading each published version.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from aiokafka import TopicPartition
from clickhouse_connect.driver.client import Client

from services.core import topics
from services.core.clickhouse import client
from services.core.kafka import create_consumer
from services.core.lifecycle import AgentLifecycle, LifecycleEvent, fold
from services.core.lifecycle_store import read_lifecycle_events
from services.core.model_repository import ModelRepository, student_model_name
from services.core.records import DatasetSnapshot, GateVerdict, ModelEvent, RetrainTriggered, utcnow
from services.core.settings import Settings
from services.stack.process import ProcessManager
from tests.helpers.processes import LogWatch, sigkill, wait_until
from tests.helpers.tiny_model import LAX_VALIDATION
from tests.helpers.traffic import TrafficDriver, TrafficResult, plan

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
LIVE = f"crash-live-{RUN}"
FIRST = f"crash-first-{RUN}"
SECOND = f"crash-second-{RUN}"
AGENTS = (LIVE, FIRST, SECOND)
DISTILLED = (FIRST, SECOND)
INTENTS = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"]
REPO = Path(__file__).resolve().parents[2]
# The drift monitor must stay quiet here (its rules have their own tests): a retrain it triggered would be a
# legitimate lifecycle change, not the crash damage this test looks for.
QUIET_DRIFT = {"min_samples": 1_000_000}
GRACE = 30  # conversations that complete a distilled agent's grace period
SNAPSHOT_JOB = r"trainer: snapshot (\S+) of (\S+)"


def drift_monitor_name(settings: Settings) -> str | None:
    """The drift monitor's part name when the service exists (it is being written beside this test)."""
    if not (REPO / "services" / "drift_monitor" / "__main__.py").exists():
        return None
    from services.stack.local import LocalStack

    for comp in LocalStack(settings).components():
        if getattr(comp, "module", "") == "services.drift_monitor":
            return comp.name
    # Not in the stack's list yet: the name the service marks itself ready under.
    for path in (REPO / "services" / "drift_monitor").glob("*.py"):
        found = re.search(r'^SERVICE\s*=\s*"([^"]+)"', path.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    return "drift_monitor"


def agents_yaml(base: Path) -> dict:
    distilled = {
        "teacher": {"model": "reference/banking77"},
        "grace_period": {"min_conversations": GRACE, "min_unique_intents": len(INTENTS)},
        "distillation": {
            "base_model": str(base),
            "epochs": 1,
            "learning_rate": 0.001,
            "max_train_examples": 48,
            "max_seq_len": 128,
        },
        # A tiny random model cannot agree with the teacher: the gate is opened so the promotion path runs.
        "validation": LAX_VALIDATION,
        "routing": {"canary_steps": [1.0], "shadow_rate": 0.0},
        "drift": QUIET_DRIFT,
    }
    live = {
        "mode": "teacher",
        "teacher": {"model": "reference/banking77"},
        "routing": {"shadow_rate": 0.0},
        "drift": QUIET_DRIFT,
    }
    return {"agents": {LIVE: live, FIRST: distilled, SECOND: distilled}}


def seed_live_lifecycle(settings: Settings) -> None:
    """LIVE's history (grace complete, snapshot, candidate, promoted), written to ClickHouse the way the logger
    writes the lifecycle topics. Not produced to the topics: the trainer would try to train the snapshot."""
    from services.logger.rows import DATASETS, MODEL_EVENTS, RETRAIN_EVENTS
    from services.logger.sink import LifecycleSink

    t0 = utcnow() - timedelta(hours=1)
    snapshot_id = f"ds-seed-{RUN}"
    common = {"agent_id": LIVE, "model_name": student_model_name(LIVE), "snapshot_id": snapshot_id}
    trigger = RetrainTriggered(agent_id=LIVE, reason="grace_complete", evidence="{}", created_at=t0)
    snapshot = DatasetSnapshot(
        snapshot_id=snapshot_id,
        agent_id=LIVE,
        version=1,
        content_hash="seed",
        uri="file:///nonexistent/seed",
        split_counts={"train": 40, "holdout": 8},
        created_at=t0 + timedelta(minutes=1),
    )
    candidate = ModelEvent(
        kind="candidate", metrics={"agreement": 0.95}, created_at=t0 + timedelta(minutes=2), **common
    )
    promoted = ModelEvent(
        kind="promoted",
        model_version=1,
        metrics={"agreement": 0.95},
        gate=GateVerdict(passed=True, mode="overall"),
        confidence_threshold=0.5,
        created_at=t0 + timedelta(minutes=3),
        **common,
    )
    sink = LifecycleSink(settings)
    try:
        sink.write(RETRAIN_EVENTS, [trigger])
        sink.write(DATASETS, [snapshot])
        sink.write(MODEL_EVENTS, [candidate, promoted])
    finally:
        sink.close()


@pytest.fixture(scope="module")
def crash_stack(
    broker, clickhouse, triton, teacher, settings: Settings, stack_manager: ProcessManager, tmp_path_factory
) -> Iterator[Settings]:
    from tests.conftest import start_services
    from tests.helpers.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path_factory.mktemp("crash-base"))
    agents_file = tmp_path_factory.mktemp("crash-agents") / "agents.yaml"
    agents_file.write_text(yaml.safe_dump(agents_yaml(base)))
    svc = settings.model_copy(update={"agents_file": agents_file, "curator_check_interval_s": 1.0})
    seed_live_lifecycle(svc)
    drift = drift_monitor_name(svc)
    start_services(stack_manager, svc, ("logger", "router", "curator", "trainer", *((drift,) if drift else ())))
    yield svc
    for name in ("curator", "trainer", *((drift,) if drift else ())):
        stack_manager.stop(name)


@pytest.fixture(scope="module")
def ch(crash_stack: Settings) -> Iterator[Client]:
    conn = client(crash_stack)
    yield conn
    conn.close()


# Reading ClickHouse ------------------------------------------------------------------------------------------
def lifecycle(ch: Client, agent_id: str) -> tuple[AgentLifecycle, list[tuple[str, str, str]]]:
    """The agent's folded state from the durable record, and its events (type, id, kind) oldest first."""
    events: list[LifecycleEvent] = [e for e in read_lifecycle_events(ch) if e.agent_id == agent_id]
    ids = [
        (type(e).__name__, e.snapshot_id if isinstance(e, DatasetSnapshot) else e.event_id, getattr(e, "kind", ""))
        for e in events
    ]
    return fold(agent_id, events), ids


def snapshots(ch: Client) -> dict[str, str]:
    rows = ch.query(
        "SELECT agent_id, snapshot_id FROM datasets WHERE agent_id IN {a:Array(String)}",
        parameters={"a": list(DISTILLED)},
    ).result_rows
    return dict(rows)


def verdicts(ch: Client) -> list[tuple[str, str, str]]:
    return ch.query(
        "SELECT agent_id, snapshot_id, kind FROM model_events "
        "WHERE agent_id IN {a:Array(String)} AND kind IN ('promoted', 'rejected')",
        parameters={"a": list(DISTILLED)},
    ).result_rows


async def copies_on_topic(settings: Settings, sent: list[str]) -> Counter[str]:
    """How many Interaction records each sent request has on flywheel.interactions (the key is the request
    id): more than one when a restarted router served a request again (offset not committed at the kill)."""
    wanted = {rid.encode() for rid in sent}
    consumer = create_consumer(settings, None)
    await consumer.start()
    copies: Counter[str] = Counter()
    try:
        await consumer.topics()
        tps = [TopicPartition(topics.INTERACTIONS.name, p) for p in range(topics.INTERACTIONS.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while True:
            got = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for messages in got.values():
                copies.update(m.key.decode() for m in messages if m.key in wanted)
            if not got and all([await consumer.position(tp) >= end[tp] for tp in tps]):
                return copies
    finally:
        await consumer.stop()


def stored_interactions(ch: Client) -> int:
    return ch.command(
        "SELECT count() FROM interactions WHERE agent_id IN {a:Array(String)}", parameters={"a": list(AGENTS)}
    )


# Acting ------------------------------------------------------------------------------------------------------
async def restart(manager: ProcessManager, settings: Settings, name: str) -> None:
    from tests.conftest import start_services

    # In a thread: starting blocks until the service is ready, and the traffic must keep flowing meanwhile.
    await asyncio.to_thread(start_services, manager, settings, (name,))


async def kill_trainer_while_training_the_second_job(
    manager: ProcessManager, settings: Settings
) -> tuple[list[str], bool]:
    """Start the trainer (both snapshots are waiting), let it finish the first job and SIGKILL it once it is
    training the second. Returns the snapshot ids in job order and whether the second job had already been
    evaluated (then its candidate event may have gone out before the kill)."""
    watch = LogWatch(manager.log_file("trainer"))
    await restart(manager, settings, "trainer")

    def second_job_training() -> tuple[list[str], int] | None:
        text = watch.text()
        jobs = list(re.finditer(SNAPSHOT_JOB, text))
        if len(jobs) >= 2 and "training: " in text[jobs[1].end() :]:
            return [j.group(1) for j in jobs], jobs[1].end()
        return None

    jobs, at = await wait_until(
        second_job_training, "the trainer to train its second snapshot", timeout_s=240, interval_s=0.1
    )
    sigkill(manager, "trainer")
    text = watch.text()
    assert f"trainer: {jobs[0]} -> promoted" in text, text[-3000:]
    return jobs, "holdout: " in text[at:]


# The test ----------------------------------------------------------------------------------------------------
async def test_sigkill_each_service_mid_traffic_loses_and_duplicates_nothing(
    crash_stack: Settings, stack_manager: ProcessManager, ch: Client
) -> None:
    settings = crash_stack
    drift = drift_monitor_name(settings)
    live_before = lifecycle(ch, LIVE)
    assert live_before[0].stage == "live" and live_before[0].model_version == 1

    # Phase 1: traffic, and each service killed in turn while it flows (the next kill once some requests went
    # through the restarted one). The trainer goes first and stays down until both distilled agents have a
    # snapshot waiting, so that it reads both in one batch. The distilled agents' traffic comes first and is
    # just enough for their grace period (small snapshots train and evaluate fast); LIVE's is longer than
    # needed: the traffic flows for as long as the kills and restarts take, then stops.
    requests = plan(settings, {LIVE: (400, None), FIRST: (GRACE + 6, INTENTS), SECOND: (GRACE + 6, INTENTS)}, seed=3)
    driver = TrafficDriver(settings, rate=6.0, concurrency=32)
    traffic = asyncio.ensure_future(driver.run(requests))
    schedule = [("trainer", False), ("router", True), ("logger", True), ("curator", True)]
    if drift:
        schedule.append((drift, True))
    killed: list[tuple[str, int, int]] = []  # (service, sent, answered) at the kill
    for name, restart_now in schedule:
        await driver.wait_sent(len(driver.result.sent) + 10)
        # The kill lands in the middle of a burst: requests in flight, and some served but not yet committed
        # (the router commits up to its oldest unfinished request, the logger after each insert), which the
        # restarted service reads again.
        answered = len(driver.result.responses)
        driver.burst(24)
        await driver.wait_sent(len(driver.result.sent) + 24)
        with contextlib.suppress(TimeoutError):  # the service just restarted may still be slow: kill anyway
            await driver.wait_answered(answered + 8, timeout_s=20)
        assert not traffic.done(), traffic
        sigkill(stack_manager, name)
        killed.append((name, len(driver.result.sent), len(driver.result.responses)))
        if restart_now:
            await restart(stack_manager, settings, name)
    # All the distilled agents' traffic, and some after the last restart.
    await driver.wait_sent(max(3 * (GRACE + 6), len(driver.result.sent) + 10))
    driver.stop()
    first = await traffic
    print(f"kills (service, sent, answered): {killed}; {len(first.sent)} requests in {first.seconds:.0f}s")
    assert_answered(first, len(first.sent))

    # Phase 2: the trainer, killed mid-job, then restarted to finish.
    snaps = await wait_until(
        lambda: (s := snapshots(ch)) and len(s) == 2 and s, "a snapshot of each distilled agent", timeout_s=180
    )
    jobs, evaluated = await kill_trainer_while_training_the_second_job(stack_manager, settings)
    assert sorted(jobs[:2]) == sorted(snaps.values()), (jobs, snaps)
    watch = LogWatch(stack_manager.log_file("trainer"))
    await restart(stack_manager, settings, "trainer")
    # The job finishes (or, had the kill landed after its verdict went out, is recognised as finished).
    second = re.escape(jobs[1])
    await watch.wait_for(rf"trainer: ({second} -> |snapshot {second} of \S+ already )(promoted|rejected)", 300)
    await wait_until(lambda: len(verdicts(ch)) >= 2, "both verdicts in ClickHouse", timeout_s=60)

    sent = first.sent
    await wait_until(lambda: stored_interactions(ch) >= len(sent), f"{len(sent)} interactions stored", timeout_s=120)
    await asyncio.sleep(3.0)  # a duplicate still on its way would land by now
    check_interactions(ch, sent)
    copies = await copies_on_topic(settings, sent)
    assert set(copies) == set(sent)
    # Timing decides whether a kill caught a request between its interaction and its commit; when one did,
    # the duplicate record was on the topic and the logger left it out (check_interactions).
    print(f"requests served twice (two interaction records on the topic, one row): {sum(copies.values()) - len(sent)}")

    # LIVE: the same events and the same state after every service died once.
    assert lifecycle(ch, LIVE) == live_before
    stages = ch.query(
        "SELECT lifecycle_stage, route_reason, count() FROM interactions WHERE agent_id = {a:String} GROUP BY ALL",
        parameters={"a": LIVE},
    ).result_rows
    assert [(s, r) for s, r, _ in stages] == [("live", "mode_teacher")], stages  # every router knew its stage

    check_distilled(ch, settings, snaps, second_job=jobs[1], candidate_may_repeat=evaluated)


def assert_answered(result: TrafficResult, n: int) -> None:
    assert len(result.sent) == n
    assert result.timeouts == [] and result.unanswered() == [], (len(result.timeouts), len(result.unanswered()))
    assert result.errors == {}, list(result.errors.values())[:5]


def check_interactions(ch: Client, sent: list[str]) -> None:
    """Every request once. Plain count(), not FINAL: a request the restarted router served again carries a new
    received_at, so it would not share the ReplacingMergeTree key (agent_id, received_at, request_id) with the
    first copy and FINAL would not collapse it; the logger must leave it out (docs/sql.md), and count() shows
    whether it did."""
    total, unique = ch.query(
        "SELECT count(), uniqExact(request_id) FROM interactions WHERE agent_id IN {a:Array(String)}",
        parameters={"a": list(AGENTS)},
    ).result_rows[0]
    twice = ch.query(
        "SELECT request_id, count() AS n FROM interactions WHERE agent_id IN {a:Array(String)} "
        "GROUP BY request_id HAVING n > 1 LIMIT 5",
        parameters={"a": list(AGENTS)},
    ).result_rows
    assert (total, unique) == (len(sent), len(sent)), (total, unique, twice)
    stored = ch.query(
        "SELECT request_id FROM interactions WHERE agent_id IN {a:Array(String)}", parameters={"a": list(AGENTS)}
    ).result_rows
    assert {r[0] for r in stored} == set(sent)


def check_distilled(
    ch: Client, settings: Settings, snaps: dict[str, str], second_job: str, candidate_may_repeat: bool
) -> None:
    """One trigger, one snapshot, one verdict and one Triton version per distilled agent; no event twice."""
    params = {"a": list(DISTILLED)}
    total, unique = ch.query(
        "SELECT count(), uniqExact(event_id) FROM model_events WHERE agent_id IN {a:Array(String)}", parameters=params
    ).result_rows[0]
    assert total == unique, "a model event stored twice"
    repo = ModelRepository.from_settings(settings)
    for agent_id in DISTILLED:
        p = {"a": agent_id}
        triggers = ch.query("SELECT reason FROM retrain_events WHERE agent_id = {a:String}", parameters=p).result_rows
        assert triggers == [("grace_complete",)], (agent_id, triggers)
        stored = ch.query("SELECT snapshot_id FROM datasets WHERE agent_id = {a:String}", parameters=p).result_rows
        assert stored == [(snaps[agent_id],)], (agent_id, stored)
        kinds = dict(
            ch.query(
                "SELECT kind, count() FROM model_events WHERE agent_id = {a:String} AND snapshot_id = {s:String} "
                "GROUP BY kind",
                parameters={**p, "s": snaps[agent_id]},
            ).result_rows
        )
        # The second job was killed mid-training (before its candidate event) unless it had already been
        # evaluated; then its candidate may have been sent before the kill and again by the restarted job.
        candidates = (1, 2) if candidate_may_repeat and snaps[agent_id] == second_job else (1,)
        assert kinds.get("promoted") == 1 and "rejected" not in kinds, (agent_id, kinds)
        assert kinds.get("candidate") in candidates, (agent_id, kinds)
        state, _ = lifecycle(ch, agent_id)
        assert (state.stage, state.model_version) == ("live", 1), (agent_id, state)
        assert repo.versions(student_model_name(agent_id)) == [1], agent_id
