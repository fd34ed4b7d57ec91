-- 0002: the durable record of the lifecycle topics (flywheel.models, flywheel.datasets, flywheel.retrain).
-- A starting service rebuilds each agent's stage from these tables, then follows the topics, so a broker
-- that forgets its topics (the local one) loses nothing. Keyed by the event id: replays collapse.
CREATE TABLE IF NOT EXISTS model_events
(
    event_id            String,
    agent_id            LowCardinality(String),
    kind                Enum8('candidate' = 1, 'promoted' = 2, 'rejected' = 3, 'rolled_back' = 4),
    model_name          LowCardinality(String),
    model_version       Nullable(Int64),
    base_model          LowCardinality(String),
    adapter_uri         Nullable(String),
    snapshot_id         Nullable(String),
    metrics             Map(LowCardinality(String), Float64),
    gate_passed         Nullable(Bool),
    gate_mode           LowCardinality(String),
    gate_reasons        Array(String),
    confidence_threshold Nullable(Float64),
    lineage             Map(LowCardinality(String), String),
    code_version        LowCardinality(String),
    created_at          DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, created_at, event_id);

CREATE TABLE IF NOT EXISTS datasets
(
    snapshot_id         String,
    agent_id            LowCardinality(String),
    version             Int32,
    content_hash        String,
    uri                 String,
    split_counts        Map(LowCardinality(String), Int64),
    intent_counts       Map(String, Int64),
    filter_stats        Map(LowCardinality(String), Int64),
    prompt              String CODEC(ZSTD(3)),
    source_query        String CODEC(ZSTD(3)),
    time_from           Nullable(DateTime64(6, 'UTC')),
    time_to             Nullable(DateTime64(6, 'UTC')),
    parent_snapshot_id  Nullable(String),
    trigger_reason      LowCardinality(Nullable(String)),
    code_version        LowCardinality(String),
    created_at          DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, snapshot_id);

CREATE TABLE IF NOT EXISTS retrain_events
(
    event_id            String,
    agent_id            LowCardinality(String),
    reason              Enum8('grace_complete' = 1, 'agreement_drift' = 2, 'intent_shift' = 3,
                              'fallback_rate' = 4, 'manual' = 5),
    evidence            String CODEC(ZSTD(3)),
    created_at          DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, created_at, event_id);
