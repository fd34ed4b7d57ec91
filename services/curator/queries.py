# ruff: noqa: S608 - the f-strings join constant fragments; every value is a ClickHouse query parameter
"""The curator's SQL (ClickHouse), in one place so docs/curation.md can show the same text.

Every query reads ``interactions`` one row per request_id (``LIMIT 1 BY request_id``: a replay never counts
twice even before the ReplacingMergeTree merges) and takes the agent as a query parameter. The effective
intent is the client's label, else the curator's label (``intent_labels``), else the intent or tool that the
teacher's answer names: the same rule as the ``interaction_intents`` view (``infra/clickhouse/0010``).
"""

from __future__ import annotations

# Plan rows of plan-and-execute agents (docs/plan-execute.md) name no intent and are no training pair: their
# steps, with the same conversation id, are what the curator counts, labels and curates.
NOT_PLAN = "route_reason NOT IN ('plan', 'plan_invalid')"

# One row per request of the selected agents ({agents:Array(String)}), with its effective intent.
_DEDUPED = f"""
    SELECT *
    FROM interactions
    WHERE has({{agents:Array(String)}}, agent_id) AND {NOT_PLAN}
    ORDER BY request_id, inserted_at DESC
    LIMIT 1 BY request_id
"""

_LABELS = """
    SELECT request_id, argMax(intent, labelled_at) AS label, argMax(source, labelled_at) AS label_source
    FROM intent_labels
    WHERE has({agents:Array(String)}, agent_id)
    GROUP BY request_id
"""

EFFECTIVE_INTENT = """coalesce(
        nullIf(i.intent, ''),
        nullIf(l.label, ''),
        nullIf(JSONExtractString(ifNull(i.teacher_content, ''), 'intent'), ''),
        nullIf(JSONExtractString(ifNull(i.teacher_content, ''), 'tool'), ''),
        nullIf(JSONExtractString(i.teacher_tool_calls, 1, 'name'), ''))"""

# Grace progress per agent: conversations served (answered: served_by != 'none'), unique effective intents,
# first and last interaction.
GRACE_SQL = f"""
SELECT
    i.agent_id AS agent_id,
    uniqExactIf(i.conversation_id, i.served_by != 'none') AS conversations,
    uniqExactIf({EFFECTIVE_INTENT}, i.served_by != 'none') AS unique_intents,
    min(i.received_at) AS first_at,
    max(i.received_at) AS last_at
FROM ({_DEDUPED}) AS i
LEFT JOIN ({_LABELS}) AS l ON i.request_id = l.request_id
GROUP BY agent_id
"""

# Conversations served up to a moment (the traffic at a rejection, for the retry growth).
CONVERSATIONS_UNTIL_SQL = f"""
SELECT uniqExactIf(i.conversation_id, i.served_by != 'none')
FROM ({_DEDUPED}) AS i
WHERE i.received_at <= {{until:DateTime64(6, 'UTC')}}
"""

# Interactions without a label row yet: what the labelling pass has to do (oldest request ids first).
UNLABELLED_SQL = f"""
SELECT request_id, agent_id, intent, teacher_content, teacher_tool_calls, user_text
FROM interactions
WHERE agent_id = {{agent:String}} AND {NOT_PLAN}
  AND request_id NOT IN (SELECT request_id FROM intent_labels WHERE agent_id = {{agent:String}})
ORDER BY request_id, inserted_at DESC
LIMIT 1 BY request_id
LIMIT {{limit:UInt32}}
"""

# A few labelled requests per intent, the reference points of the clustering (only fetched when some
# request needs a cluster).
LABEL_SAMPLES_SQL = """
SELECT l.intent AS intent, i.user_text AS user_text
FROM (
    SELECT request_id, argMax(intent, labelled_at) AS intent FROM intent_labels
    WHERE agent_id = {agent:String} GROUP BY request_id
) AS l
INNER JOIN (
    SELECT request_id, any(user_text) AS user_text FROM interactions
    WHERE agent_id = {agent:String} GROUP BY request_id
) AS i ON i.request_id = l.request_id
WHERE i.user_text != ''
ORDER BY l.intent, l.request_id
LIMIT {per_intent:UInt32} BY l.intent
"""

CLUSTER_NAMES_SQL = """
SELECT DISTINCT intent FROM intent_labels WHERE agent_id = {agent:String} AND startsWith(intent, 'cluster_')
"""

# The candidate pairs of a snapshot: every request the teacher answered (served, fallback or shadow), all
# history up to {until}. teacher_ran rows that are not training candidates are the teacher's errors: they are
# read too, so that the teacher_error filter counts them.
CANDIDATES_SQL = f"""
SELECT
    i.request_id AS request_id,
    i.messages AS messages,
    i.user_text AS user_text,
    i.teacher_content AS teacher_content,
    i.teacher_tool_calls AS teacher_tool_calls,
    i.teacher_error AS teacher_error,
    i.teacher_finish_reason AS finish_reason,
    {EFFECTIVE_INTENT} AS intent,
    nullIf(i.metadata['gold_intent'], '') AS gold,
    i.received_at AS received_at
FROM ({_DEDUPED}) AS i
LEFT JOIN ({_LABELS}) AS l ON i.request_id = l.request_id
WHERE i.teacher_ran AND (i.training_candidate OR i.shadow OR i.teacher_error IS NOT NULL)
  AND i.received_at <= {{until:DateTime64(6, 'UTC')}}
ORDER BY request_id
"""

LATEST_SNAPSHOT_SQL = """
SELECT snapshot_id, version FROM datasets FINAL
WHERE agent_id = {agent:String}
ORDER BY created_at DESC, version DESC
LIMIT 1
"""
