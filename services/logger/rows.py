"""Records → ClickHouse rows (pure): the column layouts of ``infra/clickhouse/0001``, ``0002`` and ``0004`` and
the mapping of each record onto them.

Interactions are mapped twice, on purpose:

* ``INTERACTION_SELECT`` is the mapping ClickHouse runs on the hot path, over the Avro records as they are
  (see ``framing``): decoding 100,000 records a second is beyond Python, not beyond ClickHouse.
* ``interaction_row`` is the same mapping in Python: readable, unit-tested for every combination of answers,
  and the oracle that ``tests/integration/test_logger.py`` holds the SQL to (the two must give the same rows).
  It is also the way to seed the table from typed records (tests, tools) without the logger.

The JSON text columns (``messages``, ``*_tool_calls``) are compact JSON, keys in schema order, nulls kept,
non-ASCII text as UTF-8. ClickHouse and Python agree on the JSON value; the text differs only in escapes
that decode the same (ClickHouse writes ``\\u001F`` and escapes U+2028/U+2029, Python ``\\u001f`` and not).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import ConsumerRecord

from services.core.codec import AvroCodec, DecodeError
from services.core.records import (
    AgentControl,
    Answer,
    ChatMessage,
    DatasetSnapshot,
    DeadLetter,
    Interaction,
    ModelEvent,
    Record,
    RetrainTriggered,
)
from services.core.topics import DLQ_SUFFIX

ANSWER_FIELDS = (
    "ran",
    "content",
    "tool_calls",
    "model",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "error",
)

INTERACTION_COLUMNS: tuple[str, ...] = (
    "request_id",
    "conversation_id",
    "agent_id",
    "received_at",
    "responded_at",
    "messages",
    "user_text",
    "tools",
    "intent",
    "metadata",
    "served_by",
    "route_reason",
    "shadow",
    "training_candidate",
    "lifecycle_stage",
    *(f"teacher_{name}" for name in ANSWER_FIELDS),
    *(f"student_{name}" for name in ANSWER_FIELDS),
    "student_model_version",
    "student_confidence",
    "teacher_finish_reason",  # 0004; teacher only: the curator's not_final filter reads it
    "cost_usd",
    "teacher_only_cost_usd",
)


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _answer(answer: Answer | None) -> tuple[Any, ...]:
    """The nine teacher_*/student_* columns; a model that did not run gives ran = False and defaults."""
    if answer is None:
        return (False, None, "[]", "", 0.0, 0, 0, 0.0, None)
    calls = to_json([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in answer.tool_calls])
    return (
        True,
        answer.content,
        calls,
        answer.model,
        answer.latency_ms,
        answer.input_tokens,
        answer.output_tokens,
        answer.cost_usd,
        answer.error,
    )


def message_row(m: ChatMessage) -> dict[str, Any]:
    """One message in the ``messages`` JSON, as the ClickHouse mapping writes it (``tool_calls`` since schema v2;
    rows stored before have no such key)."""
    return {
        "role": m.role,
        "content": m.content,
        "name": m.name,
        "tool_call_id": m.tool_call_id,
        "tool_calls": [c.model_dump() for c in m.tool_calls],
    }


def interaction_row(rec: Interaction) -> tuple[Any, ...]:
    """One ``interactions`` row, in ``INTERACTION_COLUMNS`` order."""
    messages = to_json([message_row(m) for m in rec.messages])
    user_text = next((m.content for m in reversed(rec.messages) if m.role == "user"), "")
    student = rec.student
    return (
        rec.request_id,
        rec.conversation_id,
        rec.agent_id,
        rec.received_at,
        rec.responded_at,
        messages,
        user_text,
        rec.tools,
        rec.intent,
        dict(rec.metadata),
        rec.served_by,
        rec.route_reason,
        rec.shadow,
        rec.training_candidate,
        rec.lifecycle_stage,
        *_answer(rec.teacher),
        *_answer(student),
        (student.model_version or "") if student is not None else "",
        student.confidence if student is not None else None,
        rec.teacher.finish_reason if rec.teacher is not None else None,
        rec.cost_usd,
        rec.teacher_only_cost_usd,
    )


def _answer_sql(side: str) -> list[str]:
    """The nine teacher_*/student_* expressions over the staged Avro tuple ``src.<side>``.

    A null answer reads as a tuple of NULLs (``framing.clickhouse_structure``); ``model`` is never null in an
    answer that is there, so it tells the two apart.
    """

    def field(name: str) -> str:
        return f"tupleElement(src.{side}, '{name}')"

    return [
        f"{field('model')} IS NOT NULL",
        field("content"),
        f"toJSONString({field('tool_calls')})",
        f"ifNull({field('model')}, '')",
        f"ifNull({field('latency_ms')}, 0)",
        f"ifNull({field('input_tokens')}, 0)",
        f"ifNull({field('output_tokens')}, 0)",
        f"ifNull({field('cost_usd')}, 0)",
        field("error"),
    ]


# The mapping in SQL, column for column with INTERACTION_COLUMNS, over a relation `src` with the columns of
# framing.clickhouse_structure(interaction schema). Source columns are always qualified (src.x): several
# output columns carry the name of a source column with another value (messages), and an unqualified name
# could resolve to the output alias.
_INTERACTION_EXPRESSIONS: tuple[str, ...] = (
    "src.request_id",
    "src.conversation_id",
    "src.agent_id",
    "src.received_at",
    "src.responded_at",
    "toJSONString(src.messages)",
    "tupleElement(arrayLast(m -> tupleElement(m, 'role') = 'user', src.messages), 'content')",
    "src.tools",
    "src.intent",
    "src.metadata",
    "src.served_by",
    "src.route_reason",
    "src.shadow",
    "src.training_candidate",
    "src.lifecycle_stage",
    *_answer_sql("teacher"),
    *_answer_sql("student"),
    "ifNull(tupleElement(src.student, 'model_version'), '')",
    "tupleElement(src.student, 'confidence')",
    "tupleElement(src.teacher, 'finish_reason')",  # NULL inside a null teacher tuple too
    "src.cost_usd",
    "src.teacher_only_cost_usd",
)

INTERACTION_SELECT = "SELECT\n    " + ",\n    ".join(
    f"{expr} AS {name}" for expr, name in zip(_INTERACTION_EXPRESSIONS, INTERACTION_COLUMNS, strict=True)
)
# ClickHouse escapes "/" as "\/" in JSON by default; both are valid JSON, this keeps the text like Python's.
INTERACTION_SELECT_SETTINGS = {"output_format_json_escape_forward_slashes": 0}


# Lifecycle events ---------------------------------------------------------------------------------------
def model_event_row(rec: ModelEvent) -> tuple[Any, ...]:
    gate = rec.gate
    return (
        rec.event_id,
        rec.agent_id,
        rec.kind,
        rec.model_name,
        rec.model_version,
        rec.base_model,
        rec.adapter_uri,
        rec.snapshot_id,
        dict(rec.metrics),
        gate.passed if gate is not None else None,
        gate.mode if gate is not None else "",
        list(gate.reasons) if gate is not None else [],
        rec.confidence_threshold,
        dict(rec.lineage),
        rec.code_version,
        rec.created_at,
        rec.error,
    )


def dataset_row(rec: DatasetSnapshot) -> tuple[Any, ...]:
    return (
        rec.snapshot_id,
        rec.agent_id,
        rec.version,
        rec.content_hash,
        rec.uri,
        dict(rec.split_counts),
        dict(rec.intent_counts),
        dict(rec.filter_stats),
        rec.prompt,
        rec.source_query,
        rec.time_from,
        rec.time_to,
        rec.parent_snapshot_id,
        rec.trigger_reason,
        rec.code_version,
        rec.created_at,
    )


def retrain_row(rec: RetrainTriggered) -> tuple[Any, ...]:
    return (rec.event_id, rec.agent_id, rec.reason, rec.evidence, rec.created_at)


@dataclass(frozen=True)
class TableSpec:
    """Where one lifecycle topic's records go: the table, its columns, the row mapping, and the id column
    that makes a replay collapse (the sink skips ids already in the table)."""

    table: str
    columns: tuple[str, ...]
    row: Callable[[Any], tuple[Any, ...]]
    id_column: str
    id_of: Callable[[Any], str] | None = None  # for records without an id field of their own

    def record_id(self, rec: Record) -> str:
        return self.id_of(rec) if self.id_of is not None else str(getattr(rec, self.id_column))


MODEL_EVENTS = TableSpec(
    "model_events",
    (
        "event_id",
        "agent_id",
        "kind",
        "model_name",
        "model_version",
        "base_model",
        "adapter_uri",
        "snapshot_id",
        "metrics",
        "gate_passed",
        "gate_mode",
        "gate_reasons",
        "confidence_threshold",
        "lineage",
        "code_version",
        "created_at",
        "error",
    ),
    model_event_row,
    "event_id",
)
DATASETS = TableSpec(
    "datasets",
    (
        "snapshot_id",
        "agent_id",
        "version",
        "content_hash",
        "uri",
        "split_counts",
        "intent_counts",
        "filter_stats",
        "prompt",
        "source_query",
        "time_from",
        "time_to",
        "parent_snapshot_id",
        "trigger_reason",
        "code_version",
        "created_at",
    ),
    dataset_row,
    "snapshot_id",
)


def control_change_id(rec: AgentControl) -> str:
    return f"{rec.agent_id}@{rec.created_at.isoformat()}"


def control_row(rec: AgentControl) -> tuple[Any, ...]:
    return (
        control_change_id(rec),
        rec.agent_id,
        rec.mode,
        rec.tier,
        dict(rec.thresholds),
        rec.changed_by,
        rec.created_at,
    )


CONTROL_EVENTS = TableSpec(
    "control_events",
    ("change_id", "agent_id", "mode", "tier", "thresholds", "changed_by", "created_at"),
    control_row,
    "change_id",
    control_change_id,
)
RETRAIN_EVENTS = TableSpec(
    "retrain_events", ("event_id", "agent_id", "reason", "evidence", "created_at"), retrain_row, "event_id"
)


# Dead letters -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredDeadLetter:
    """One record of a .dlq topic, as the dead_letters table keeps it."""

    id: str  # '<dlq topic>:<partition>:<offset>'
    dlq_topic: str
    letter: DeadLetter


def stored_dead_letter(msg: ConsumerRecord, codec: AvroCodec) -> StoredDeadLetter:
    """A .dlq record as a row; one that is not a readable DeadLetter is kept whole, with the reason."""
    try:
        letter = codec.decode(msg.value or b"", DeadLetter)
    except DecodeError as err:
        letter = DeadLetter(
            source_topic=msg.topic.removesuffix(DLQ_SUFFIX),
            partition=-1,
            offset=-1,
            key=msg.key,
            value=msg.value,
            error_kind="unreadable_dead_letter",
            error=f"the dead letter itself could not be read ({err.reason}); value holds its bytes",
            service="logger",
        )
    return StoredDeadLetter(f"{msg.topic}:{msg.partition}:{msg.offset}", msg.topic, letter)  # type: ignore[arg-type]


def dead_letter_row(stored: StoredDeadLetter) -> tuple[Any, ...]:
    letter = stored.letter
    return (
        stored.id,
        stored.dlq_topic,
        letter.source_topic,
        letter.partition,
        letter.offset,
        letter.error_kind,
        letter.error,
        letter.service,
        letter.key,
        letter.value,
        letter.created_at,
    )


DEAD_LETTERS = TableSpec(
    "dead_letters",
    (
        "id",
        "dlq_topic",
        "source_topic",
        "source_partition",
        "source_offset",
        "error_kind",
        "error",
        "service",
        "key",
        "value",
        "created_at",
    ),
    dead_letter_row,
    "id",
)
