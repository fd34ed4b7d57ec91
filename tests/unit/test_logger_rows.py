"""The logger's record → row mapping (``services.logger.rows``) for every combination of answers, the
lifecycle rows, and the Avro container framing that carries interactions to ClickHouse."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro
import pytest

from services.core.codec import HEADER_LEN, AvroCodec
from services.core.records import (
    Answer,
    ChatMessage,
    DatasetSnapshot,
    GateVerdict,
    Interaction,
    ModelEvent,
    RetrainTriggered,
    ToolCall,
)
from services.logger.framing import ContainerWriter, clickhouse_structure, compact_schema_json, zigzag_long
from services.logger.rows import (
    DATASETS,
    INTERACTION_COLUMNS,
    INTERACTION_SELECT,
    MODEL_EVENTS,
    RETRAIN_EVENTS,
    interaction_row,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
ANSWER_JSON = '{"intent":"card_arrival","tool":"track_card","arguments":{"card":"visa"},"reply":"On its way."}'


def teacher_answer(**changes) -> Answer:
    base = {
        "content": ANSWER_JSON,
        "model": "reference/banking77",
        "latency_ms": 410.5,
        "input_tokens": 120,
        "output_tokens": 31,
        "cost_usd": 0.000165,
    }
    return Answer(**{**base, **changes})


def student_answer(**changes) -> Answer:
    base = {
        "content": ANSWER_JSON,
        "model": "student_support",
        "model_version": "3",
        "confidence": 0.93,
        "latency_ms": 48.0,
        "input_tokens": 120,
        "output_tokens": 31,
        "cost_usd": 0.000113,
    }
    return Answer(**{**base, **changes})


def interaction(agent: str = "support", i: int = 0, **changes) -> Interaction:
    base = {
        "request_id": f"{agent}-req-{i}",
        "conversation_id": f"{agent}-conv-{i}",
        "agent_id": agent,
        "messages": [
            ChatMessage(role="system", content="You route banking requests."),
            ChatMessage(role="user", content="Where is my card?"),
            ChatMessage(role="assistant", content="Which card?"),
            ChatMessage(role="user", content="The visa / débit one 💳", name="ana"),
        ],
        "intent": "card_arrival",
        "metadata": {"channel": "web"},
        "teacher": teacher_answer(),
        "served_by": "teacher",
        "route_reason": "grace_period",
        "training_candidate": True,
        "lifecycle_stage": "grace",
        "cost_usd": 0.000165,
        "teacher_only_cost_usd": 0.000165,
        "received_at": T0 + timedelta(milliseconds=i),
        "responded_at": T0 + timedelta(milliseconds=i + 410),
    }
    return Interaction(**{**base, **changes})


def cases(agent: str = "support") -> dict[str, Interaction]:
    """One interaction per combination of answers the router records."""
    return {
        "teacher_only": interaction(agent, 0),
        "student_only": interaction(
            agent,
            1,
            teacher=None,
            student=student_answer(),
            served_by="student",
            route_reason="confident",
            training_candidate=False,
            lifecycle_stage="live",
            cost_usd=0.000113,
        ),
        "both_shadow": interaction(
            agent,
            2,
            student=student_answer(content=ANSWER_JSON.replace("visa", "mastercard")),
            served_by="student",
            route_reason="confident",
            shadow=True,
            training_candidate=False,
            lifecycle_stage="live",
            cost_usd=0.000278,
        ),
        "low_confidence": interaction(
            agent,
            3,
            student=student_answer(confidence=0.41, model_version=None),
            route_reason="low_confidence",
            lifecycle_stage="live",
            cost_usd=0.000278,
        ),
        "student_error": interaction(
            agent,
            4,
            student=student_answer(content=None, confidence=None, error="model student_support is not loaded"),
            route_reason="student_error",
            lifecycle_stage="live",
        ),
        "teacher_error": interaction(
            agent,
            5,
            teacher=teacher_answer(content=None, error="HTTP 503 from teacher", output_tokens=0, cost_usd=0.0),
            served_by="none",
            training_candidate=False,
            cost_usd=0.0,
        ),
        "tool_calls_no_user": interaction(
            agent,
            6,
            messages=[ChatMessage(role="system", content="tools only")],
            teacher=teacher_answer(
                content=None,
                tool_calls=[ToolCall(id="call_1", name="track_card", arguments='{"card": "visa"}')],
                finish_reason="tool_calls",
            ),
            tools='[{"type":"function","function":{"name":"track_card"}}]',
            intent=None,
            metadata={},
        ),
        "teacher_cut_off": interaction(
            agent,
            7,
            teacher=teacher_answer(content='{"intent":"card_arr', finish_reason="length"),
            student=student_answer(confidence=0.2, finish_reason="stop"),
            route_reason="low_confidence",
            lifecycle_stage="live",
        ),
    }


def as_dict(rec: Interaction) -> dict:
    row = interaction_row(rec)
    assert len(row) == len(INTERACTION_COLUMNS)
    return dict(zip(INTERACTION_COLUMNS, row, strict=True))


def test_columns_are_the_tables_minus_defaults() -> None:
    migrations = Path(__file__).resolve().parents[2] / "infra" / "clickhouse"
    ddl = (migrations / "0001_interactions.sql").read_text()
    body = ddl[ddl.index("(") + 1 : ddl.index("ENGINE")]
    table_columns = re.findall(r"^\s{4}(\w+)\s", body, flags=re.M)
    # Columns added by later migrations (0004 teacher_finish_reason...).
    for path in sorted(migrations.glob("[0-9]*.sql")):
        table_columns += re.findall(
            r"ALTER TABLE interactions ADD COLUMN IF NOT EXISTS (\w+)\s", path.read_text(), flags=re.M
        )
    assert set(table_columns) - set(INTERACTION_COLUMNS) == {"intent_source", "inserted_at"}  # both DEFAULT
    assert set(INTERACTION_COLUMNS) <= set(table_columns)
    assert len(set(INTERACTION_COLUMNS)) == len(INTERACTION_COLUMNS)


def test_teacher_only() -> None:
    row = as_dict(cases()["teacher_only"])
    assert row["teacher_ran"] is True and row["student_ran"] is False
    assert row["teacher_content"] == ANSWER_JSON
    assert row["teacher_model"] == "reference/banking77"
    assert (row["teacher_latency_ms"], row["teacher_input_tokens"], row["teacher_output_tokens"]) == (410.5, 120, 31)
    assert row["teacher_cost_usd"] == pytest.approx(0.000165)
    assert row["teacher_tool_calls"] == "[]" and row["teacher_error"] is None
    # The student did not run: defaults, and no confidence or version.
    assert row["student_content"] is None and row["student_model"] == "" and row["student_tool_calls"] == "[]"
    assert (row["student_latency_ms"], row["student_input_tokens"], row["student_cost_usd"]) == (0.0, 0, 0.0)
    assert row["student_model_version"] == "" and row["student_confidence"] is None
    assert row["served_by"] == "teacher" and row["route_reason"] == "grace_period"
    assert row["received_at"] == T0 and row["responded_at"] == T0 + timedelta(milliseconds=410)


def test_user_text_is_the_last_user_message_and_messages_are_json() -> None:
    row = as_dict(cases()["teacher_only"])
    assert row["user_text"] == "The visa / débit one 💳"
    messages = json.loads(row["messages"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3] == {
        "role": "user",
        "content": "The visa / débit one 💳",
        "name": "ana",
        "tool_call_id": None,
        "tool_calls": [],
    }
    assert "débit" in row["messages"] and "\\/" not in row["messages"]  # UTF-8 text, slashes not escaped
    assert row["metadata"] == {"channel": "web"} and row["intent"] == "card_arrival"


def test_student_only() -> None:
    row = as_dict(cases()["student_only"])
    assert row["student_ran"] is True and row["teacher_ran"] is False
    assert row["student_model"] == "student_support" and row["student_model_version"] == "3"
    assert row["student_confidence"] == pytest.approx(0.93)
    assert row["student_latency_ms"] == 48.0 and row["student_cost_usd"] == pytest.approx(0.000113)
    assert row["teacher_content"] is None and row["teacher_model"] == "" and row["teacher_cost_usd"] == 0.0
    assert row["served_by"] == "student" and row["route_reason"] == "confident"
    assert row["lifecycle_stage"] == "live" and row["training_candidate"] is False


def test_both_answers_on_a_shadow_sample() -> None:
    row = as_dict(cases()["both_shadow"])
    assert row["teacher_ran"] and row["student_ran"] and row["shadow"] is True
    assert json.loads(row["teacher_content"])["arguments"] == {"card": "visa"}
    assert json.loads(row["student_content"])["arguments"] == {"card": "mastercard"}
    assert row["cost_usd"] == pytest.approx(0.000278)
    assert row["teacher_only_cost_usd"] == pytest.approx(0.000165)


def test_fallbacks_and_errors() -> None:
    low = as_dict(cases()["low_confidence"])
    assert low["route_reason"] == "low_confidence" and low["served_by"] == "teacher"
    assert low["student_confidence"] == pytest.approx(0.41) and low["student_model_version"] == ""
    failed_student = as_dict(cases()["student_error"])
    assert failed_student["student_ran"] is True
    assert failed_student["student_error"] == "model student_support is not loaded"
    assert failed_student["student_content"] is None and failed_student["student_confidence"] is None
    failed_teacher = as_dict(cases()["teacher_error"])
    assert failed_teacher["teacher_ran"] is True and failed_teacher["served_by"] == "none"
    assert failed_teacher["teacher_error"] == "HTTP 503 from teacher" and failed_teacher["teacher_content"] is None


def test_teacher_finish_reason() -> None:
    """The teacher's finish_reason has a column (0004) for the curator's not_final filter; NULL when the
    teacher did not run or did not say; the student's finish_reason is not stored."""
    rows = {name: as_dict(rec) for name, rec in cases().items()}
    assert rows["teacher_only"]["teacher_finish_reason"] is None  # the teacher did not say
    assert rows["student_only"]["teacher_finish_reason"] is None  # the teacher did not run
    assert rows["teacher_cut_off"]["teacher_finish_reason"] == "length"  # the student's "stop" is not stored
    assert rows["tool_calls_no_user"]["teacher_finish_reason"] == "tool_calls"


def test_tool_calls_and_no_user_message() -> None:
    row = as_dict(cases()["tool_calls_no_user"])
    assert row["user_text"] == ""
    assert json.loads(row["teacher_tool_calls"]) == [
        {"id": "call_1", "name": "track_card", "arguments": '{"card": "visa"}'}
    ]
    assert row["tools"].startswith("[{") and row["intent"] is None and row["metadata"] == {}


def test_sql_mapping_lists_every_column_in_order() -> None:
    aliases = re.findall(r" AS (\w+)(?:,|$)", INTERACTION_SELECT, flags=re.M)
    assert tuple(aliases) == INTERACTION_COLUMNS


# Lifecycle rows ---------------------------------------------------------------------------------------
def test_model_event_row() -> None:
    event = ModelEvent(
        agent_id="support",
        kind="promoted",
        model_name="student_support",
        model_version=4,
        base_model="SmolLM2-135M",
        snapshot_id="snap-1",
        metrics={"agreement": 0.94},
        gate=GateVerdict(passed=True, mode="selective", reasons=["agreement 0.94 >= 0.92"]),
        confidence_threshold=0.7,
        lineage={"dataset": "snap-1"},
        created_at=T0,
    )
    row = dict(zip(MODEL_EVENTS.columns, MODEL_EVENTS.row(event), strict=True))
    assert row["event_id"] == event.event_id and MODEL_EVENTS.record_id(event) == event.event_id
    assert (row["kind"], row["model_version"], row["gate_passed"], row["gate_mode"]) == (
        "promoted",
        4,
        True,
        "selective",
    )
    assert row["gate_reasons"] == ["agreement 0.94 >= 0.92"] and row["metrics"] == {"agreement": 0.94}
    no_gate = dict(
        zip(
            MODEL_EVENTS.columns,
            MODEL_EVENTS.row(ModelEvent(agent_id="a", kind="candidate", model_name="m")),
            strict=True,
        )
    )
    assert (no_gate["gate_passed"], no_gate["gate_mode"], no_gate["gate_reasons"]) == (None, "", [])


def test_dataset_and_retrain_rows() -> None:
    snap = DatasetSnapshot(
        snapshot_id="snap-2",
        agent_id="support",
        version=2,
        content_hash="sha256:ab",
        uri="file:///data/snap-2",
        split_counts={"train": 850, "holdout": 150},
        intent_counts={"card_arrival": 40},
        time_from=T0,
        parent_snapshot_id="snap-1",
        trigger_reason="agreement_drift",
        created_at=T0,
    )
    row = dict(zip(DATASETS.columns, DATASETS.row(snap), strict=True))
    assert DATASETS.record_id(snap) == "snap-2" and row["version"] == 2 and row["time_to"] is None
    assert row["split_counts"] == {"train": 850, "holdout": 150} and row["trigger_reason"] == "agreement_drift"
    retrain = RetrainTriggered(agent_id="support", reason="intent_shift", evidence='{"new_intents": 5}')
    assert RETRAIN_EVENTS.row(retrain) == (
        retrain.event_id,
        "support",
        "intent_shift",
        '{"new_intents": 5}',
        retrain.created_at,
    )


# Avro container framing -------------------------------------------------------------------------------
def test_zigzag() -> None:
    assert [zigzag_long(n) for n in (0, -1, 1, 2, 63, 64, 8191)] == [
        b"\x00",
        b"\x01",
        b"\x02",
        b"\x04",
        b"\x7e",
        b"\x80\x01",
        b"\xfe\x7f",
    ]


def test_container_of_bodies_reads_back_with_any_avro_reader() -> None:
    codec = AvroCodec()
    latest = codec.latest["interaction"]
    records = list(cases().values())
    bodies = [codec.encode(r)[HEADER_LEN:] for r in records]
    writer = ContainerWriter(compact_schema_json(latest.path.read_text()))
    blob = writer.container(bodies)
    # The logger hands over whole single-object records and has the header skipped: the same container.
    assert writer.container([codec.encode(r) for r in records], skip=HEADER_LEN) == blob
    read = list(fastavro.reader(io.BytesIO(blob)))
    assert [Interaction.model_validate(d) for d in read] == records
    # Logical types survive (ClickHouse must see timestamps, not plain longs).
    assert '"logicalType":"timestamp-micros"' in fastavro.reader(io.BytesIO(blob)).metadata["avro.schema"]


def top_level(structure: str) -> list[str]:
    """The column definitions of a structure (commas inside types ignored)."""
    columns, depth, start = [], 0, 0
    for i, ch in enumerate(structure):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            columns.append(structure[start:i].strip())
            start = i + 1
    return [*columns, structure[start:].strip()]


def test_clickhouse_structure_follows_the_schema() -> None:
    schema = json.loads(AvroCodec().latest["interaction"].path.read_text())
    structure = clickhouse_structure(schema)
    assert [f["name"] for f in schema["fields"]] == [c.split("`")[1] for c in top_level(structure)]
    assert "`received_at` DateTime64(6, 'UTC')" in structure
    assert "`served_by` String" in structure  # enums read as their symbols
    # A nullable record: a Tuple whose primitive fields are Nullable (null reads as all-NULL), arrays kept.
    teacher = re.search(r"`teacher` Tuple\((.*?)\), `student`", structure).group(1)
    assert "`model` Nullable(String)" in teacher and "`latency_ms` Nullable(Float64)" in teacher
    assert "`tool_calls` Array(Tuple(`id` String, `name` String, `arguments` String))" in teacher
    assert "`tools` Nullable(String)" in structure and "`metadata` Map(String, String)" in structure


def test_clickhouse_structure_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="unions"):
        clickhouse_structure({"type": "record", "name": "R", "fields": [{"name": "x", "type": ["int", "string"]}]})
    with pytest.raises(ValueError, match="record schema"):
        clickhouse_structure({"type": "enum", "name": "E", "symbols": ["a"]})
