-- 0006: every stored request id, ordered by it. The logger's duplicate check (services/logger/sink.py) looks a
-- batch's request ids up here, by primary key: a request served twice is found however far apart the two
-- were served (before, the lookup ran on interactions within a 900 s window of received_at). The materialized
-- view fills it in the same insert as interactions, so a row is never in one and missing from the other.
CREATE TABLE IF NOT EXISTS interaction_ids
(
    request_id   String,
    agent_id     LowCardinality(String),
    received_at  DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY request_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS interaction_ids_mv TO interaction_ids AS
SELECT request_id, agent_id, received_at FROM interactions;

-- The ids stored before this migration (a row written meanwhile may land twice: harmless, only presence counts).
INSERT INTO interaction_ids SELECT request_id, agent_id, received_at FROM interactions;
