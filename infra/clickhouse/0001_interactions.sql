-- 0001: interactions, one row per served request (the logger writes flywheel.interactions here).
-- Serves the grace-period intent diversity, traffic split by route, agreement on shadow samples, fallback
-- rate, cost versus teacher-only and latency by route (docs/sql.md). ReplacingMergeTree keyed by
-- (agent_id, received_at, request_id): a replayed record lands on the same key, so merges and FINAL keep one
-- row per request and a replay never double-counts.
CREATE TABLE IF NOT EXISTS interactions
(
    request_id          String,
    conversation_id     String,
    agent_id            LowCardinality(String),
    received_at         DateTime64(6, 'UTC'),
    responded_at        DateTime64(6, 'UTC'),
    -- The request: all chat messages as JSON, and the last user message on its own for labelling/search.
    messages            String CODEC(ZSTD(3)),
    user_text           String CODEC(ZSTD(3)),
    tools               Nullable(String) CODEC(ZSTD(3)),
    -- Intent: the client's label. intent_source says where the final label came from (client, teacher,
    -- cluster), null until the curator labels unlabelled traffic.
    intent              LowCardinality(Nullable(String)),
    intent_source       LowCardinality(String) DEFAULT '',
    metadata            Map(LowCardinality(String), String),
    served_by           Enum8('none' = 0, 'teacher' = 1, 'student' = 2),
    route_reason        LowCardinality(String),
    shadow              Bool,
    training_candidate  Bool,
    lifecycle_stage     LowCardinality(String),
    -- Teacher answer. teacher_ran = 0 when it did not run (then the other teacher_* columns are defaults).
    teacher_ran         Bool,
    teacher_content     Nullable(String) CODEC(ZSTD(3)),
    teacher_tool_calls  String CODEC(ZSTD(3)),
    teacher_model       LowCardinality(String),
    teacher_latency_ms  Float64,
    teacher_input_tokens  UInt32,
    teacher_output_tokens UInt32,
    teacher_cost_usd    Float64,
    teacher_error       Nullable(String),
    -- Student answer. student_ran = 0 when it did not run.
    student_ran         Bool,
    student_content     Nullable(String) CODEC(ZSTD(3)),
    student_tool_calls  String CODEC(ZSTD(3)),
    student_model       LowCardinality(String),
    student_model_version LowCardinality(String),
    student_confidence  Nullable(Float64),
    student_latency_ms  Float64,
    student_input_tokens  UInt32,
    student_output_tokens UInt32,
    student_cost_usd    Float64,
    student_error       Nullable(String),
    cost_usd            Float64,
    teacher_only_cost_usd Float64,
    inserted_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(received_at)
ORDER BY (agent_id, received_at, request_id);
