"""The Avro codec: exact single-object bytes, round trips of every record, and each way a payload can fail."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import fastavro
import pytest

from services.core.codec import MAGIC, AvroCodec, DecodeError
from services.core.records import (
    AgentControl,
    Answer,
    ChatMessage,
    DatasetSnapshot,
    DeadLetter,
    GateVerdict,
    InferenceRequest,
    InferenceResponse,
    Interaction,
    ModelEvent,
    RetrainTriggered,
    ToolCall,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def _request(**kw) -> InferenceRequest:
    base = dict(
        request_id="r1",
        conversation_id="c1",
        agent_id="support-bot",
        messages=[ChatMessage(role="user", content="hi")],
        created_at=T0,
    )
    return InferenceRequest(**{**base, **kw})


def test_exact_bytes_of_a_request(codec: AvroCodec) -> None:
    fp = codec.latest["inference_request"].fingerprint
    body = (
        b"\x04r1"  # request_id: zigzag length 2
        b"\x04c1"
        b"\x16support-bot"
        b"\x02"  # one-item array block
        b"\x02\x04hi\x00\x00\x00"  # role=user(1), content, name=null, tool_call_id=null, no tool_calls (v2)
        b"\x00"  # end of array
        b"\x00\x00\x00"  # tools, intent null; empty metadata map
        b"\x00"  # reply_topic null
    )
    micros = int(T0.timestamp() * 1_000_000)
    zz = (micros << 1) ^ (micros >> 63)
    varint = bytearray()
    while zz > 0x7F:
        varint.append((zz & 0x7F) | 0x80)
        zz >>= 7
    varint.append(zz)
    assert codec.encode(_request()) == MAGIC + fp + body + bytes(varint)


def test_fingerprint_is_crc64_avro_little_endian(codec: AvroCodec) -> None:
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    sv = codec.latest["inference_request"]
    assert sv.fingerprint == bytes.fromhex(fingerprint(to_parsing_canonical_form(sv.parsed), "CRC-64-AVRO"))
    # The Avro spec's reference value for the schema "int" (share/test/data/schema-tests.txt), written
    # little-endian as the single-object header carries it.
    assert int.from_bytes(bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO")), "little") == 8247732601305521295


ANSWER = Answer(
    content='{"intent":"card_arrival"}',
    tool_calls=[ToolCall(id="t1", name="lookup", arguments='{"a":1}')],
    model="teacher",
    latency_ms=12.5,
    input_tokens=10,
    output_tokens=5,
    cost_usd=0.0001,
)

RECORDS = [
    _request(tools='[{"type":"function"}]', intent="card_arrival", metadata={"k": "v"}, reply_topic="x"),
    InferenceResponse(
        request_id="r1",
        conversation_id="c1",
        agent_id="a",
        content="x",
        served_by="student",
        confidence=0.9,
        tool_calls=[ToolCall(id="1", name="n")],
        created_at=T0,
    ),
    Interaction(
        request_id="r1",
        conversation_id="c1",
        agent_id="a",
        messages=[ChatMessage(role="user", content="x")],
        teacher=ANSWER,
        student=ANSWER.model_copy(update={"model": "student_a", "confidence": 0.4}),
        served_by="teacher",
        route_reason="low_confidence",
        shadow=False,
        training_candidate=True,
        received_at=T0,
        responded_at=T0,
    ),
    DatasetSnapshot(
        snapshot_id="s",
        agent_id="a",
        version=2,
        content_hash="h",
        uri="file:///x",
        split_counts={"train": 85, "holdout": 15},
        time_from=T0,
        created_at=T0,
    ),
    ModelEvent(
        agent_id="a",
        kind="promoted",
        model_name="student_a",
        model_version=3,
        metrics={"agreement": 0.95},
        gate=GateVerdict(passed=True, mode="overall", reasons=[]),
        created_at=T0,
    ),
    RetrainTriggered(agent_id="a", reason="agreement_drift", evidence='{"window":"1h"}', created_at=T0),
    AgentControl(agent_id="a", mode="student", thresholds={"confidence_threshold": 0.8}, created_at=T0),
    DeadLetter(
        source_topic="t",
        partition=0,
        offset=5,
        key=b"k",
        value=b"\x00\xff",
        error_kind="bad_body",
        error="x",
        service="router",
        created_at=T0,
    ),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(codec: AvroCodec, record) -> None:
    data = codec.encode(record)
    assert data[:2] == MAGIC
    assert codec.decode(data, type(record)) == record


BAD = [
    (b"", "truncated"),
    (MAGIC + b"\x01\x02", "truncated"),
    (b"\x00\x01" + b"\x00" * 20, "not_single_object"),
    (b'{"json": "payload"}', "not_single_object"),
    (MAGIC + b"\xde\xad\xbe\xef\x00\x00\x00\x00" + b"\x02x", "unknown_fingerprint"),
]


@pytest.mark.parametrize(("data", "kind"), BAD)
def test_bad_headers(codec: AvroCodec, data: bytes, kind: str) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert info.value.kind == kind


def test_truncated_body(codec: AvroCodec) -> None:
    data = codec.encode(_request())
    with pytest.raises(DecodeError) as info:
        codec.decode(data[:-4])
    assert info.value.kind == "truncated"
    assert "inference_request" in str(info.value)


def test_body_that_does_not_match(codec: AvroCodec) -> None:
    header = codec.encode(_request())[:10]
    with pytest.raises(DecodeError) as info:
        codec.decode(header + b"\x02r\x02c\x02a\x02\x12")  # a message role of enum index 9 (of 4)
    assert info.value.kind == "bad_body"


def test_trailing_bytes(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode(_request()) + b"\x00")
    assert info.value.kind == "bad_body"
    assert "trailing" in info.value.reason


def test_wrong_record_for_topic(codec: AvroCodec) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode(RECORDS[5]), InferenceRequest)
    assert info.value.kind == "wrong_record"


def test_old_writer_read_as_new_version(tmp_path: Path, codec: AvroCodec) -> None:
    """A record written with v1 decodes after v2 adds a field with a default."""
    import shutil

    schemas = tmp_path / "schemas"
    shutil.copytree(codec.schemas_dir, schemas)
    v1 = json.loads((schemas / "retrain_triggered" / "v1.avsc").read_text())
    v2 = json.loads(json.dumps(v1))
    v2["fields"].append({"name": "priority", "type": "int", "default": 0})
    (schemas / "retrain_triggered" / "v2.avsc").write_text(json.dumps(v2))
    newer = AvroCodec(schemas)
    old_bytes = codec.encode(RECORDS[5])
    name, datum = newer.decode_dict(old_bytes)
    assert name == "retrain_triggered"
    assert datum["priority"] == 0 and datum["reason"] == "agreement_drift"


def test_a_v1_request_reads_as_v2_and_assistant_tool_calls_round_trip(codec: AvroCodec) -> None:
    """v2 of the request and interaction schemas gives messages their tool calls; v1 producers still decode."""
    from services.core.records import ToolCall

    v1 = codec.versions["inference_request"][0]
    assert v1.version == 1
    old = _request()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1.parsed, old.model_dump())
    decoded = codec.decode(MAGIC + v1.fingerprint + buf.getvalue(), InferenceRequest)
    assert decoded == old and decoded.messages[0].tool_calls == []
    call = ToolCall(id="call_1", name="card_block", arguments='{"card": "1"}')
    turns = [
        ChatMessage(role="user", content="block my card"),
        ChatMessage(role="assistant", content="", tool_calls=[call]),
        ChatMessage(role="tool", content='{"ok": true}', tool_call_id="call_1"),
    ]
    request = _request(messages=turns)
    assert codec.decode(codec.encode(request), InferenceRequest) == request
