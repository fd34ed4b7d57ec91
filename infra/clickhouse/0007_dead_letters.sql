-- 0007: the dead letters of every topic (the .dlq topics), stored by the logger so they outlive the broker
-- (the local one keeps topics in memory) and can be listed, shown and replayed (`flywheel dlq`). One row per
-- dead-letter record, keyed by where it sits in its .dlq topic: a re-read collapses. `value` and `key` hold the
-- failed record's raw bytes, exactly as they were on the source topic.
CREATE TABLE IF NOT EXISTS dead_letters
(
    id                  String,  -- '<dlq topic>:<partition>:<offset>'
    dlq_topic           LowCardinality(String),
    source_topic        LowCardinality(String),
    source_partition    Int32,
    source_offset       Int64,
    error_kind          LowCardinality(String),
    error               String,
    service             LowCardinality(String),
    key                 Nullable(String),
    value               Nullable(String) CODEC(ZSTD(3)),
    created_at          DateTime64(6, 'UTC'),
    stored_at           DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY id;

-- Each replay of a dead letter (`flywheel dlq replay`): where it went and when.
CREATE TABLE IF NOT EXISTS dead_letter_replays
(
    id                  String,
    replayed_at         DateTime64(6, 'UTC'),
    replayed_to         LowCardinality(String),
    edited              Bool
)
ENGINE = MergeTree
ORDER BY (id, replayed_at);
