"""Typed records, one per schema in ``schemas/`` (the ``.avsc`` files are the source of truth; a test keeps
these models and the latest schema versions field-for-field in step). Encode and decode them with
``services.core.codec``."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]
Server = Literal["teacher", "student", "none"]
ModelEventKind = Literal["candidate", "promoted", "rejected", "rolled_back", "failed"]
RetrainReason = Literal["grace_complete", "agreement_drift", "intent_shift", "fallback_rate", "manual"]
AgentMode = Literal["teacher", "student", "auto"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class Record(BaseModel):
    """Base of every Avro record; ``SCHEMA`` names its folder in ``schemas/``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[str]


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Role
    content: str  # "" for an assistant turn that only calls tools
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # an assistant turn's calls, sent back as they came


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    model: str
    model_version: str | None = None
    confidence: float | None = None
    latency_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    finish_reason: str | None = None


class GateVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    passed: bool
    mode: str
    reasons: list[str] = Field(default_factory=list)


class InferenceRequest(Record):
    SCHEMA: ClassVar[str] = "inference_request"
    request_id: str = Field(default_factory=new_id)
    conversation_id: str
    agent_id: str
    messages: list[ChatMessage]
    tools: str | None = None
    intent: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    reply_topic: str | None = None
    created_at: AwareDatetime = Field(default_factory=utcnow)


class InferenceResponse(Record):
    SCHEMA: ClassVar[str] = "inference_response"
    request_id: str
    conversation_id: str
    agent_id: str
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    served_by: Server = "none"
    model_version: str | None = None
    confidence: float | None = None
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None
    created_at: AwareDatetime = Field(default_factory=utcnow)
    input_tokens: int = 0  # what the serving model read and wrote (0: not counted, e.g. a plan's answer)
    output_tokens: int = 0
    finish_reason: str | None = None


class Interaction(Record):
    SCHEMA: ClassVar[str] = "interaction"
    request_id: str
    conversation_id: str
    agent_id: str
    messages: list[ChatMessage]
    tools: str | None = None
    intent: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    teacher: Answer | None = None
    student: Answer | None = None
    served_by: Server = "none"
    route_reason: str
    shadow: bool = False
    training_candidate: bool = False
    lifecycle_stage: str = "grace"
    cost_usd: float = 0.0
    teacher_only_cost_usd: float = 0.0
    received_at: AwareDatetime
    responded_at: AwareDatetime


class DatasetSnapshot(Record):
    SCHEMA: ClassVar[str] = "dataset_snapshot"
    snapshot_id: str
    agent_id: str
    version: int
    content_hash: str
    uri: str
    split_counts: dict[str, int] = Field(default_factory=dict)
    intent_counts: dict[str, int] = Field(default_factory=dict)
    filter_stats: dict[str, int] = Field(default_factory=dict)
    prompt: str = ""
    source_query: str = ""
    time_from: AwareDatetime | None = None
    time_to: AwareDatetime | None = None
    parent_snapshot_id: str | None = None
    trigger_reason: str | None = None
    code_version: str = ""
    created_at: AwareDatetime = Field(default_factory=utcnow)


class ModelEvent(Record):
    SCHEMA: ClassVar[str] = "model_event"
    event_id: str = Field(default_factory=new_id)
    agent_id: str
    kind: ModelEventKind
    model_name: str
    model_version: int | None = None
    base_model: str = ""
    adapter_uri: str | None = None
    snapshot_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: GateVerdict | None = None
    confidence_threshold: float | None = None
    lineage: dict[str, str] = Field(default_factory=dict)
    code_version: str = ""
    created_at: AwareDatetime = Field(default_factory=utcnow)
    error: str | None = None  # failed: why the training job could not finish


class RetrainTriggered(Record):
    SCHEMA: ClassVar[str] = "retrain_triggered"
    event_id: str = Field(default_factory=new_id)
    agent_id: str
    reason: RetrainReason
    evidence: str = "{}"
    created_at: AwareDatetime = Field(default_factory=utcnow)


class AgentControl(Record):
    SCHEMA: ClassVar[str] = "agent_control"
    agent_id: str
    mode: AgentMode | None = None
    tier: str | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    changed_by: str = ""
    created_at: AwareDatetime = Field(default_factory=utcnow)


class DeadLetter(Record):
    SCHEMA: ClassVar[str] = "dead_letter"
    source_topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = None
    error_kind: str
    error: str
    service: str
    created_at: AwareDatetime = Field(default_factory=utcnow)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.SCHEMA: cls
    for cls in (
        InferenceRequest,
        InferenceResponse,
        Interaction,
        DatasetSnapshot,
        ModelEvent,
        RetrainTriggered,
        AgentControl,
        DeadLetter,
    )
}
