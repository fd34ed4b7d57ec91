-- 0003: a bloom-filter skip index on interactions.request_id. Serves the logger's duplicate check (before each
-- insert it looks up the batch's request ids within the batch's agents and time span: services/logger/sink.py)
-- and lookups of one request by id (docs/sql.md). The primary key (agent_id, received_at, request_id) cannot
-- find a request id alone; this index lets ClickHouse skip the granules that cannot hold it.
ALTER TABLE interactions ADD INDEX IF NOT EXISTS request_id_bloom request_id TYPE bloom_filter(0.001) GRANULARITY 1;

-- Parts written before this migration get the index too (a no-op on an empty table).
ALTER TABLE interactions MATERIALIZE INDEX request_id_bloom;
