# ruff: noqa: S608 - the f-strings join constant fragments; every value is a ClickHouse query parameter
"""The dashboard's SQL (ClickHouse), adapted from the cookbook in docs/sql.md (``traffic_by_route``,
``shadow_agreement``, ``cost_savings``, ``latency_by_route``) to a chosen time bucket and one agent.

Parameters: ``{agent:String}`` (one agent, or ``''`` for all in the summary), ``{since:DateTime64(6, 'UTC')}``
(the window's start) and ``{bucket:UInt32}`` (the bucket width in seconds). Buckets are epoch-aligned Unix
timestamps (``t``), so the page and the pure assembly (``services.dashboard.data``) need no time zone.
Every query reads ``interactions FINAL``: a copy that two loggers wrote during a rebalance (docs/sql.md)
counts once even before the ReplacingMergeTree merges it away.
"""

from __future__ import annotations

from services.core.sql_fragments import AGREE, SHADOW_SAMPLE

_BUCKET = "intDiv(toUInt32(toUnixTimestamp(received_at)), {bucket:UInt32}) * {bucket:UInt32}"
_IN_WINDOW = "agent_id = {agent:String} AND received_at >= {since:DateTime64(6, 'UTC')}"

# All-time figures per agent: the agent list and the start of the "auto" window (first_at).
SUMMARY_SQL = f"""
WITH {AGREE}, {SHADOW_SAMPLE} AS is_sample
SELECT
    agent_id,
    count() AS requests,
    countIf(served_by = 'student') AS student_served,
    countIf(served_by = 'teacher') AS teacher_served,
    countIf(served_by = 'none') AS failed,
    sum(cost_usd) AS actual_usd,
    sum(teacher_only_cost_usd) AS teacher_only_usd,
    countIf(is_sample) AS shadow_samples,
    countIf(is_sample AND agree) AS shadow_agreed,
    min(received_at) AS first_at,
    max(received_at) AS last_at
FROM interactions FINAL
WHERE {{agent:String}} = '' OR agent_id = {{agent:String}}
GROUP BY agent_id
ORDER BY agent_id
"""

# Who served and why, per bucket (the cookbook's traffic_by_route).
TRAFFIC_SQL = f"""
SELECT
    {_BUCKET} AS t,
    toString(served_by) AS served_by,
    route_reason,
    count() AS requests
FROM interactions FINAL
WHERE {_IN_WINDOW}
GROUP BY t, served_by, route_reason
ORDER BY t, served_by, route_reason
"""

# Agreement on shadow samples per bucket (the cookbook's shadow_agreement).
AGREEMENT_SQL = f"""
WITH {AGREE}
SELECT
    {_BUCKET} AS t,
    count() AS samples,
    countIf(agree) AS agreed
FROM interactions FINAL
WHERE {SHADOW_SAMPLE} AND {_IN_WINDOW}
GROUP BY t
ORDER BY t
"""

# What the traffic cost against the teacher-only baseline per bucket (the cookbook's cost_savings).
COST_SQL = f"""
SELECT
    {_BUCKET} AS t,
    count() AS requests,
    sum(cost_usd) AS actual_usd,
    sum(teacher_only_cost_usd) AS teacher_only_usd
FROM interactions FINAL
WHERE {_IN_WINDOW}
GROUP BY t
ORDER BY t
"""

# Latency of the served answer per server over the window (the cookbook's latency_by_route, by served_by);
# failed answers (served_by = 'none') have no latency worth showing.
LATENCY_SQL = f"""
WITH if(served_by = 'student', student_latency_ms, teacher_latency_ms) AS served_latency_ms
SELECT
    toString(served_by) AS served_by,
    count() AS requests,
    quantile(0.5)(served_latency_ms) AS p50_ms,
    quantile(0.95)(served_latency_ms) AS p95_ms,
    quantile(0.95)(dateDiff('microsecond', received_at, responded_at) / 1000) AS p95_end_to_end_ms
FROM interactions FINAL
WHERE served_by != 'none' AND {_IN_WINDOW}
GROUP BY served_by
ORDER BY served_by
"""

# The tables the dashboard reads; missing ones mean the migrations were not applied.
REQUIRED_TABLES = ("interactions", "model_events", "retrain_events", "datasets")
PRESENT_TABLES_SQL = """
SELECT name FROM system.tables WHERE database = currentDatabase() AND has({tables:Array(String)}, name)
"""
