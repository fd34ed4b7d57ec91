"""The curator service: grace-period tracking, intent labelling and data set snapshots.

On start it reads every agent's lifecycle from ClickHouse (the durable record), then follows
``flywheel.models``, ``flywheel.retrain`` and ``flywheel.datasets`` from their start. Every
``check_interval_s`` it labels new traffic, then decides per agent (``decide``, pure, from the events alone):

* ``build``: a retrain trigger (any reason) newer than the agent's latest snapshot: curate all history into a
  snapshot and emit ``DatasetSnapshot`` (parent = the previous snapshot);
* ``grace``: the agent is in its first grace period (no trigger yet): check the criteria; when complete emit
  ``RetrainTriggered(grace_complete)`` with the figures as evidence;
* ``retry``: its last student was rejected (or its training job failed) and none is live: once traffic grew
  by ``curation.retry_growth`` since the rejection, emit ``RetrainTriggered(grace_complete)`` with
  ``"retry": true`` in the evidence.

Everything is decided from state, not from the arrival of one event, so a restart (the topics replayed from
the start, or empty) neither repeats a trigger nor rebuilds a snapshot that exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.core import topics
from services.core.agents import AgentConfig, AgentsFile, load_agents
from services.core.clickhouse import param_time
from services.core.codec import AvroCodec
from services.core.kafka import Publisher
from services.core.lifecycle import LifecycleEvent, fold
from services.core.lifecycle_service import LifecycleService
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered, utcnow
from services.core.settings import Settings
from services.curator import labelling, queries
from services.curator.filters import Pair, curate, normalise_text
from services.curator.grace import GraceCounts, GraceStatus, grace_status, retry_due
from services.curator.prompt import build_prompt
from services.curator.snapshot import WrittenSnapshot, dataset_record, write_snapshot
from services.curator.split import split

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("flywheel.curator")
SERVICE = "curator"
LABEL_BATCH = 5000
CENTROID_SAMPLES = 8  # labelled examples per intent embedded as reference points for clustering


# Decisions (pure) -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str  # build | grace | retry | idle
    trigger: RetrainTriggered | None = None  # build: the trigger to serve
    rejected_at: datetime | None = None  # retry: when the last student was rejected


def decide(agent_id: str, events: Iterable[LifecycleEvent]) -> Action:
    """What the curator owes an agent, from its lifecycle events alone."""
    mine = sorted((e for e in events if e.agent_id == agent_id), key=lambda e: e.created_at)
    triggers = [e for e in mine if isinstance(e, RetrainTriggered)]
    snapshots = [e for e in mine if isinstance(e, DatasetSnapshot)]
    if triggers and (not snapshots or snapshots[-1].created_at < triggers[-1].created_at):
        return Action("build", trigger=triggers[-1])
    state = fold(agent_id, mine)
    if state.stage != "grace":
        return Action("idle")
    if not triggers:
        return Action("grace")
    models = [e for e in mine if isinstance(e, ModelEvent)]
    if models and models[-1].kind in ("rejected", "failed") and not state.has_student:
        return Action("retry", rejected_at=models[-1].created_at)
    return Action("idle")


def latest_snapshot(agent_id: str, events: Iterable[LifecycleEvent]) -> DatasetSnapshot | None:
    snaps = [e for e in events if isinstance(e, DatasetSnapshot) and e.agent_id == agent_id]
    return max(snaps, key=lambda e: e.created_at) if snaps else None


# Reading ClickHouse -----------------------------------------------------------------------------------------
def _utc(value: datetime | None) -> datetime | None:
    from datetime import timezone

    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def grace_counts(ch: Client, agent_ids: list[str]) -> dict[str, GraceCounts]:
    result = ch.query(queries.GRACE_SQL, parameters={"agents": agent_ids})
    out = {a: GraceCounts(a) for a in agent_ids}
    for r in result.named_results():
        out[r["agent_id"]] = GraceCounts(
            r["agent_id"], int(r["conversations"]), int(r["unique_intents"]), _utc(r["first_at"]), _utc(r["last_at"])
        )
    return out


def grace_progress(settings: Settings, now: datetime | None = None) -> list[GraceStatus]:
    """Every agent's grace figures against its criteria (for ``flywheel status``), in agents.yaml order."""
    from services.core.clickhouse import client

    agents = load_agents(settings.agents_file)
    ch = client(settings)
    try:
        counts = grace_counts(ch, list(agents.agents))
    finally:
        ch.close()
    when = now or utcnow()
    return [grace_status(counts[a], cfg.grace_period, when) for a, cfg in agents.agents.items()]


def read_pairs(ch: Client, agent_id: str, until: datetime) -> list[Pair]:
    result = ch.query(queries.CANDIDATES_SQL, parameters={"agents": [agent_id], "until": param_time(until)})
    pairs = []
    for r in result.named_results():
        try:
            raw = json.loads(r["messages"] or "[]")
        except ValueError:
            raw = []
        messages = tuple(
            {"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in raw if isinstance(m, dict)
        )
        pairs.append(
            Pair(
                request_id=r["request_id"],
                messages=messages,
                user_text=r["user_text"] or "",
                teacher_content=r["teacher_content"],
                teacher_tool_calls=r["teacher_tool_calls"] or "[]",
                teacher_error=r["teacher_error"],
                finish_reason=r["finish_reason"],
                intent=r["intent"],
                gold=r["gold"],
                received_at=_utc(r["received_at"]),
            )
        )
    return pairs


def label_intents(
    ch: Client,
    agent_id: str,
    embedder: labelling.Embedder | None,
    limit: int = LABEL_BATCH,
    threshold: float = labelling.CLUSTER_THRESHOLD,
) -> Counter[str]:
    """Label the agent's interactions that have no row in ``intent_labels`` yet; returns counts per source.
    Embeddings are computed only for the requests that need a cluster (plus a few labelled reference
    examples per intent, then)."""
    rows = ch.query(queries.UNLABELLED_SQL, parameters={"agent": agent_id, "limit": limit}).result_rows
    done: list[labelling.Labelled] = []
    need: list[tuple[str, str]] = []
    for request_id, _agent, intent, content, calls, user_text in rows:
        got = labelling.label_for(intent, content, calls)
        if got is not None:
            done.append(labelling.Labelled(request_id, agent_id, got[0], got[1]))
        elif embedder is not None and (user_text or "").strip():
            need.append((request_id, user_text))
    if need and embedder is not None:
        done.extend(_cluster(ch, agent_id, need, done, embedder, threshold))
    if done:
        ch.insert(
            "intent_labels",
            [[x.request_id, x.agent_id, x.intent, x.source] for x in done],
            column_names=["request_id", "agent_id", "intent", "source"],
        )
    return Counter(x.source for x in done)


def _cluster(
    ch: Client,
    agent_id: str,
    need: list[tuple[str, str]],
    fresh: list[labelling.Labelled],
    embedder: labelling.Embedder,
    threshold: float,
) -> list[labelling.Labelled]:
    samples = ch.query(
        queries.LABEL_SAMPLES_SQL, parameters={"agent": agent_id, "per_intent": CENTROID_SAMPLES}
    ).result_rows
    # Labels written in this pass are not in ClickHouse yet; clustering only needs their names for numbering.
    ref_labels = [intent for intent, _ in samples]
    ref_vectors = embedder.embed([text for _, text in samples])
    names, cents = labelling.centroids(ref_labels, ref_vectors) if ref_labels else ([], ref_vectors)
    used = [r[0] for r in ch.query(queries.CLUSTER_NAMES_SQL, parameters={"agent": agent_id}).result_rows]
    need = sorted(need)
    vectors = embedder.embed([text for _, text in need])
    labels = labelling.assign_clusters(
        vectors,
        names,
        cents,
        threshold,
        first_index=labelling.next_cluster_index([*used, *(x.intent for x in fresh)]),
    )
    return [labelling.Labelled(rid, agent_id, label, "cluster") for (rid, _), label in zip(need, labels, strict=True)]


def build_snapshot(
    ch: Client,
    settings: Settings,
    agent: AgentConfig,
    trigger: RetrainTriggered | None,
    parent: DatasetSnapshot | None,
    embed: Callable[[list[str]], Any] | None = None,
    now: datetime | None = None,
) -> WrittenSnapshot:
    """Curate all the agent's pairs up to now into a snapshot in the artifact store (pure apart from the
    ClickHouse read and the files)."""
    until = now or utcnow()
    pairs = read_pairs(ch, agent.agent_id, until)
    result = curate(pairs, agent, embed=embed)
    # Keyed by the normalised user turn: the same traffic replayed gives the same holdout (split.py).
    kept_train, kept_holdout = split(
        result.kept,
        agent.validation.holdout_fraction,
        lambda p: normalise_text(p.user_text),
        lambda p: p.intent,
        tie=lambda p: p.request_id,
    )
    train = [dataset_record(p) for p in kept_train]
    holdout = [dataset_record(p) for p in kept_holdout]
    prompt = build_prompt(agent, train)
    times = [p.received_at for p in pairs if p.received_at is not None]
    return write_snapshot(
        settings.path("artifacts"),
        agent.agent_id,
        train,
        holdout,
        prompt,
        version=(parent.version + 1) if parent is not None else 1,
        parent_snapshot_id=parent.snapshot_id if parent is not None else None,
        trigger_reason=trigger.reason if trigger is not None else None,
        source_query=queries.CANDIDATES_SQL.strip(),
        time_from=min(times) if times else None,
        time_to=until,
        filter_stats=result.stats,
        extra_manifest={
            "source_parameters": {"agents": [agent.agent_id], "until": until.isoformat()},
            "filter_examples": result.examples,
            "trigger": trigger.model_dump(mode="json") if trigger is not None else None,
            "split": {
                "holdout_fraction": agent.validation.holdout_fraction,
                "method": "sha256(seed:normalised user turn)",
            },
        },
        created_at=until,
    )


# The service ------------------------------------------------------------------------------------------------
class Curator(LifecycleService):
    SERVICE = SERVICE

    def __init__(
        self,
        settings: Settings,
        agents: AgentsFile,
        codec: AvroCodec | None = None,
        embedder: labelling.Embedder | None = None,
        check_interval_s: float | None = None,
        near_duplicates_by_embedding: bool = True,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.agents = agents
        self.codec = codec or AvroCodec()
        self.embedder = embedder if embedder is not None else labelling.Embedder()
        self.check_interval_s = check_interval_s or settings.curator_check_interval_s
        self.near_duplicates_by_embedding = near_duplicates_by_embedding
        self.clock = clock
        self.events: dict[tuple[str, str], LifecycleEvent] = {}
        self.publisher: Publisher | None = None
        self.stats: Counter[str] = Counter()

    # State --------------------------------------------------------------------------------------------
    def decide(self, agent_id: str) -> Action:
        return decide(agent_id, self.events.values())

    # One round of work (blocking I/O: run it in a thread from the event loop) ----------------------------
    def step(self, ch: Client) -> list[RetrainTriggered | DatasetSnapshot]:
        """Label, then do what each agent is owed; returns the records to publish (already observed)."""
        out: list[RetrainTriggered | DatasetSnapshot] = []
        now = self.clock()
        ids = list(self.agents.agents)
        for agent_id in ids:
            threshold = self.agents.agent(agent_id).curation.cluster_threshold
            got = label_intents(ch, agent_id, self.embedder, threshold=threshold)
            for source, n in got.items():
                self.stats[f"labelled_{source}"] += n
        counts: dict[str, GraceCounts] | None = None
        for agent_id in ids:
            agent = self.agents.agent(agent_id)
            action = self.decide(agent_id)
            record: RetrainTriggered | DatasetSnapshot | None = None
            if action.kind == "grace":
                counts = counts or grace_counts(ch, ids)
                status = grace_status(counts[agent_id], agent.grace_period, now)
                if status.complete:
                    log.info("curator: %s", status.describe())
                    record = RetrainTriggered(
                        agent_id=agent_id,
                        reason="grace_complete",
                        evidence=json.dumps(status.evidence()),
                        created_at=now,
                    )
            elif action.kind == "retry" and action.rejected_at is not None:
                counts = counts or grace_counts(ch, ids)
                then = ch.query(
                    queries.CONVERSATIONS_UNTIL_SQL,
                    parameters={"agents": [agent_id], "until": param_time(action.rejected_at)},
                ).result_rows[0][0]
                current = counts[agent_id].conversations
                if retry_due(current, int(then), agent.curation.retry_growth):
                    evidence = {
                        "retry": True,
                        "conversations_at_rejection": int(then),
                        "conversations": current,
                        "retry_growth": agent.curation.retry_growth,
                        "rejected_at": action.rejected_at.isoformat(),
                    }
                    record = RetrainTriggered(
                        agent_id=agent_id, reason="grace_complete", evidence=json.dumps(evidence), created_at=now
                    )
            if record is not None:
                self.observe(record)
                out.append(record)
                action = self.decide(agent_id)
            if action.kind == "build":
                written = self._build(ch, agent, action.trigger)
                out.append(written.record)
        return out

    def _build(self, ch: Client, agent: AgentConfig, trigger: RetrainTriggered | None) -> WrittenSnapshot:
        parent = latest_snapshot(agent.agent_id, self.events.values())
        embed = self.embedder.embed if self.near_duplicates_by_embedding and self.embedder else None
        t0 = time.perf_counter()
        written = build_snapshot(ch, self.settings, agent, trigger, parent, embed=embed, now=self.clock())
        record = written.record
        if written.reused:
            # Same content as a snapshot made before: announce it again for this trigger (a new created_at
            # marks the trigger served), keeping its id, files and lineage.
            record = record.model_copy(
                update={"created_at": self.clock(), "trigger_reason": trigger.reason if trigger else None}
            )
            written = WrittenSnapshot(record, written.path, True)
        self.observe(record)
        self.stats["snapshots"] += 1
        log.info(
            "curator: %s snapshot %s v%d (%s) in %.1fs: %s; filters %s",
            agent.agent_id,
            record.snapshot_id,
            record.version,
            "reused" if written.reused else "new",
            time.perf_counter() - t0,
            record.split_counts,
            record.filter_stats,
        )
        return written

    # Kafka --------------------------------------------------------------------------------------------
    async def publish(self, records: Iterable[RetrainTriggered | DatasetSnapshot]) -> None:
        assert self.publisher is not None
        for record in records:
            topic = topics.RETRAIN if isinstance(record, RetrainTriggered) else topics.DATASETS
            await self.publisher.send(topic, record, record.agent_id)
            self.stats[f"emitted_{record.SCHEMA}"] += 1


async def _main(settings: Settings) -> None:
    curator = Curator(settings, load_agents(settings.agents_file))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await curator.run(stop)
    finally:
        log.info("curator: stopped; %s", json.dumps(dict(curator.stats)))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(Settings.load()))
