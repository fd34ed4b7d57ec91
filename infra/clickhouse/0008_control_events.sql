-- 0008: the run-time changes of flywheel.control (`flywheel agent set`: mode, tier, thresholds, who), kept by the
-- logger as an audit trail (the topic itself is compacted to the latest change per agent). Keyed by agent and
-- time: a re-read collapses.
CREATE TABLE IF NOT EXISTS control_events
(
    change_id           String,  -- '<agent_id>@<created_at ISO>'
    agent_id            LowCardinality(String),
    mode                LowCardinality(Nullable(String)),
    tier                LowCardinality(Nullable(String)),
    thresholds          Map(LowCardinality(String), Float64),
    changed_by          String,
    created_at          DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY change_id;
