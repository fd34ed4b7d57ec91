"""The topic catalogue: every topic the system uses, with its record, key and partition count, in one place.

The stack creates all of them up front (``ensure_topics``): the local broker auto-creates unknown topics with
its own default partition count, and faust-streaming tables crash with ``PartitionsMismatch`` unless a
table's changelog topic has as many partitions as its source topic, so nothing may be left to auto-creation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.core.settings import Settings

DLQ_SUFFIX = ".dlq"


class TopicError(RuntimeError):
    """A topic could not be created or exists with the wrong shape; the message names it."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    record: str | None  # schema folder in schemas/; None for topics whose records are not ours
    partitions: int
    key: str
    compacted: bool = False
    doc: str = ""

    @property
    def dlq(self) -> TopicSpec:
        return TopicSpec(self.name + DLQ_SUFFIX, "dead_letter", 1, "as received", doc=f"undecodable {self.name}")


REQUESTS = TopicSpec("flywheel.requests", "inference_request", 4, "conversation_id", doc="client requests")
RESPONSES = TopicSpec("flywheel.responses", "inference_response", 4, "conversation_id", doc="answers")
INTERACTIONS = TopicSpec("flywheel.interactions", "interaction", 4, "request_id", doc="served requests")
DATASETS = TopicSpec("flywheel.datasets", "dataset_snapshot", 1, "agent_id", doc="curated snapshots")
MODELS = TopicSpec("flywheel.models", "model_event", 1, "agent_id", doc="model lifecycle events")
RETRAIN = TopicSpec("flywheel.retrain", "retrain_triggered", 1, "agent_id", doc="retrain triggers")
CONTROL = TopicSpec("flywheel.control", "agent_control", 1, "agent_id", compacted=True, doc="run-time changes")

CATALOGUE: tuple[TopicSpec, ...] = (REQUESTS, RESPONSES, INTERACTIONS, DATASETS, MODELS, RETRAIN, CONTROL)


def changelog_topic(app_id: str, table: str, source: TopicSpec) -> TopicSpec:
    """The changelog topic faust-streaming uses for a table keyed like ``source`` (same partitions)."""
    return TopicSpec(f"{app_id}-{table}-changelog", None, source.partitions, source.key, compacted=True)


def all_topics() -> list[TopicSpec]:
    return [*CATALOGUE, *(t.dlq for t in CATALOGUE)]


def by_name(name: str) -> TopicSpec:
    for spec in all_topics():
        if spec.name == name:
            return spec
    raise TopicError(f"unknown topic {name!r}; the catalogue has: {', '.join(t.name for t in all_topics())}")


def topic_config(spec: TopicSpec, settings: Settings) -> dict[str, str]:
    """A topic's configuration at creation: compaction for changelogs, min.insync.replicas on a cluster."""
    config = {"cleanup.policy": "compact"} if spec.compacted else {}
    if settings.kafka_replication_factor > 1:  # the single local broker takes no replica settings
        config["min.insync.replicas"] = str(settings.kafka_min_insync_replicas)
    return config


def ensure_topics(settings: Settings, extra: Iterable[TopicSpec] = (), timeout_s: float = 30.0) -> list[str]:
    """Create every catalogue topic (plus ``extra``) that does not exist; check the partition counts of those
    that do. Returns the names created."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from services.core.kafka import confluent_config

    specs = [*all_topics(), *extra]
    admin = AdminClient(confluent_config(settings))
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise TopicError(f"Kafka at {settings.kafka_bootstrap} did not answer: {exc}") from exc
    wrong = [
        f"{s.name} has {len(existing[s.name].partitions)} partitions, the catalogue says {s.partitions}"
        for s in specs
        if s.name in existing and len(existing[s.name].partitions) != s.partitions
    ]
    if wrong:
        raise TopicError("topics exist with the wrong shape: " + "; ".join(wrong))
    todo = [
        NewTopic(s.name, s.partitions, settings.kafka_replication_factor, config=topic_config(s, settings))
        for s in specs
        if s.name not in existing
    ]
    created = []
    for name, future in admin.create_topics(todo, request_timeout=timeout_s).items() if todo else []:
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a concurrent creator won the race
                raise TopicError(f"cannot create topic {name}: {exc}") from exc
    return created
