"""The trainer service: consumes ``flywheel.datasets``; for each snapshot trains, evaluates, gates and
publishes (one job at a time), emitting ``ModelEvent`` records on ``flywheel.models``.

A snapshot's offset is committed only after its job finished (promoted or rejected), so a trainer that dies
mid-job trains that snapshot again after a restart. The offsets of a batch are committed once all its jobs are
done, so a restart also reads again the snapshots whose jobs did finish: those already have a verdict (in
ClickHouse, or still only on ``flywheel.models``) and are not trained or published a second time. When several
snapshots of one agent are waiting, only the newest is trained: the older ones are superseded by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core import topics
from services.core.agents import AgentConfig, AgentsFile, UnknownAgentError, load_agents
from services.core.codec import AvroCodec, DecodeError
from services.core.health import clear_ready, mark_ready
from services.core.kafka import Publisher, TopicReader, create_follower, create_producer
from services.core.model_repository import ModelRepository, student_model_name
from services.core.records import DatasetSnapshot, ModelEvent
from services.core.settings import Settings
from services.trainer.data import read_snapshot
from services.trainer.pipeline import JobOptions, run_job
from services.trainer.publish import failed_event, finish

log = logging.getLogger("flywheel.trainer")
SERVICE = "trainer"
GROUP = "flywheel-trainer"
# A failed job counts as decided: its snapshot is not trained again after a restart (a job that fails every time
# would otherwise loop); the curator retries with more data, as after a rejection.
VERDICTS = ("promoted", "rejected", "failed")


def train_snapshot(
    settings: Settings,
    agent: AgentConfig,
    uri: str,
    emit: Callable[[ModelEvent], None],
    options: JobOptions | None = None,
    repo: ModelRepository | None = None,
) -> ModelEvent:
    """One job, synchronously (the service runs it in a worker thread; tests and the CLI call it directly)."""
    snapshot = read_snapshot(uri)
    progress_file = progress_path(settings)

    def progress(info: dict[str, float]) -> None:
        # For `flywheel demo` and anyone watching: the running job's step, loss and ETA.
        payload = {"agent_id": agent.agent_id, "snapshot_id": snapshot.snapshot_id, **info}
        tmp = progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(progress_file)

    options = options or JobOptions()
    if options.threads is None:
        options = replace(options, threads=settings.thread_count("trainer_threads"))
    repo = repo or ModelRepository.from_settings(settings)
    if agent.distillation.warm_start and options.served_version is None:
        options = replace(options, served_version=repo.newest_version_dir(student_model_name(agent.agent_id)))
    result = run_job(agent, snapshot, settings.path("artifacts"), options, progress=progress)
    return finish(result, repo, emit)


def progress_path(settings: Settings) -> Path:
    """Where the trainer keeps the running job's progress (JSON: agent_id, snapshot_id, step, steps, loss,
    eta_s...)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return settings.run_dir / "trainer-progress.json"


def newest_per_agent(records: list[DatasetSnapshot]) -> list[DatasetSnapshot]:
    """The last snapshot of each agent, in arrival order (older ones of the same agent are superseded)."""
    last: dict[str, DatasetSnapshot] = {}
    for record in records:
        last.pop(record.agent_id, None)
        last[record.agent_id] = record
    return list(last.values())


def already_decided(record: DatasetSnapshot, verdicts: Iterable[ModelEvent]) -> ModelEvent | None:
    """The verdict already given on this announcement of the snapshot, if any. A snapshot the curator
    announces again (same content for a newer trigger) has a newer created_at, so it is trained again."""
    for event in verdicts:
        if event.snapshot_id == record.snapshot_id and event.kind in VERDICTS and event.created_at >= record.created_at:
            return event
    return None


class Trainer:
    def __init__(
        self,
        settings: Settings,
        options: JobOptions | None = None,
        codec: AvroCodec | None = None,
        agents: AgentsFile | None = None,
    ) -> None:
        self.settings = settings
        self.agents = agents  # fixed agents (tests); None: read agents_file for every job
        self.options = options
        self.codec = codec or AvroCodec()
        self.jobs = 0
        self.verdicts: list[ModelEvent] = []  # every promoted/rejected event seen (ClickHouse, the topic, ours)

    async def _job(self, publisher: Publisher, record: DatasetSnapshot) -> None:
        # Re-read for every job: thresholds may have been changed since the trainer started.
        agents = self.agents or load_agents(self.settings.agents_file)
        try:
            agent = agents.agent(record.agent_id)
        except UnknownAgentError as exc:
            log.error("trainer: snapshot %s skipped: %s", record.snapshot_id, exc)
            return
        done = already_decided(record, self.verdicts)
        if done is not None:
            log.info(
                "trainer: snapshot %s of %s already %s (version %s) before a restart; not trained again",
                record.snapshot_id,
                record.agent_id,
                done.kind,
                done.model_version,
            )
            return
        loop = asyncio.get_running_loop()

        def emit(event: ModelEvent) -> None:  # called from the worker thread
            fut = asyncio.run_coroutine_threadsafe(publisher.send(topics.MODELS, event, event.agent_id), loop)
            fut.result(timeout=60)

        log.info("trainer: snapshot %s of %s (%s)", record.snapshot_id, record.agent_id, record.uri)
        try:
            event = await asyncio.to_thread(train_snapshot, self.settings, agent, record.uri, emit, self.options)
        except Exception as exc:
            # A broken snapshot must not stop the trainer, nor vanish: a `failed` event takes the agent out of
            # `training` (the curator retries after more data) and says why. If it cannot be sent, the
            # exception stops the trainer before the snapshot's offset is committed: it is tried again.
            log.exception("trainer: job for snapshot %s failed", record.snapshot_id)
            event = failed_event(record, agent.distillation.base_model, f"{type(exc).__name__}: {exc}")
            await publisher.send(topics.MODELS, event, event.agent_id)
        self.verdicts.append(event)
        log.info("trainer: %s -> %s %s", record.snapshot_id, event.kind, event.model_version or event.error or "")
        self.jobs += 1

    def load_verdicts(self) -> None:
        """The verdicts so far, from ClickHouse (the durable record)."""
        from services.core.clickhouse import client
        from services.core.lifecycle_store import read_lifecycle_events

        ch = client(self.settings)
        try:
            events = read_lifecycle_events(ch)
        finally:
            ch.close()
        self.verdicts.extend(e for e in events if isinstance(e, ModelEvent) and e.kind in VERDICTS)

    async def _follow_verdicts(self, follower: AIOKafkaConsumer) -> None:
        """Read ``flywheel.models`` up to its end: a verdict sent just before a crash may not be in ClickHouse
        yet (the logger writes it a moment later, or is down itself)."""
        tps = list(follower.assignment())
        end = await follower.end_offsets(tps) if tps else {}
        while True:
            got = await follower.getmany(timeout_ms=200)
            for messages in got.values():
                for msg in messages:
                    try:
                        event = self.codec.decode(msg.value, ModelEvent)
                    except DecodeError:
                        continue  # the logger dead-letters it; nothing for the trainer to learn from it
                    if event.kind in VERDICTS:
                        self.verdicts.append(event)
            if not got and all([await follower.position(tp) >= end[tp] for tp in tps]):
                return

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self.load_verdicts)
        follower = create_follower(self.settings, None)
        await follower.start()
        await follower.topics()  # the cluster's metadata, for the partitions below
        partitions = follower.partitions_for_topic(topics.MODELS.name) or set()
        follower.assign([TopicPartition(topics.MODELS.name, p) for p in sorted(partitions)])
        producer = create_producer(self.settings)
        await producer.start()
        publisher = Publisher(producer, self.codec)
        # Jobs take minutes: allow long gaps between polls without the group evicting us.
        consumer = create_follower(self.settings, GROUP, topics.DATASETS.name, max_poll_interval_ms=3_600_000)
        await consumer.start()
        reader: TopicReader[DatasetSnapshot] = TopicReader(consumer, publisher, topics.DATASETS, SERVICE)
        mark_ready(self.settings, SERVICE)
        log.info("trainer: waiting for snapshots on %s", topics.DATASETS.name)
        try:
            while not stop.is_set():
                batch = await reader.read_batch(timeout_ms=500)
                if batch.records:
                    await self._follow_verdicts(follower)
                for delivered in newest_per_agent([d.record for d in batch.records]):
                    if stop.is_set():
                        return  # uncommitted: the snapshot is trained after the restart
                    await self._job(publisher, delivered)
                await reader.commit(batch)
        finally:
            clear_ready(self.settings, SERVICE)
            await consumer.stop()
            await producer.stop()
            await follower.stop()


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Trainer(settings).run(stop)


TRAINER_NICENESS = 10


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load()
    # Serving comes first: on a machine the trainer shares with the Triton student (the local stack: 2 cores),
    # a retrain at full priority starved the student past its gRPC deadline. A lower priority costs training
    # nothing when the cores are otherwise idle.
    with contextlib.suppress(OSError):
        os.nice(TRAINER_NICENESS)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(settings))


# CLI helpers (``flywheel models`` / ``flywheel rollback``) --------------------------------------------------
def models_text(settings: Settings, agent_id: str) -> str:
    from services.core.clickhouse import client
    from services.trainer.models import format_versions, read_model_events, versions_from_events

    ch = client(settings)
    try:
        events = read_model_events(ch, agent_id)
    finally:
        ch.close()
    rejected = sum(1 for e in events if e["kind"] == "rejected")
    text = format_versions(agent_id, versions_from_events(events), rejected)
    failed = [e for e in events if e["kind"] == "failed"]
    if failed:
        last = failed[-1]
        text += (
            f"\n{len(failed)} training job(s) failed; the last at {last['created_at']:%Y-%m-%d %H:%M:%S} "
            f"(snapshot {last['snapshot_id']}): {last['error']}"
        )
    return text


async def rollback_and_emit(settings: Settings, agent_id: str, version: int | None = None) -> ModelEvent:
    """Roll back (see ``models.rollback``) and emit the ``rolled_back`` event on ``flywheel.models``."""
    from services.core.clickhouse import client
    from services.trainer.models import read_model_events, rollback, versions_from_events

    ch = client(settings)
    try:
        rows = versions_from_events(read_model_events(ch, agent_id))
    finally:
        ch.close()
    event = await asyncio.to_thread(rollback, ModelRepository.from_settings(settings), agent_id, rows, version)
    producer = create_producer(settings)
    await producer.start()
    try:
        await Publisher(producer, AvroCodec()).send(topics.MODELS, event, agent_id)
    finally:
        await producer.stop()
    return event
