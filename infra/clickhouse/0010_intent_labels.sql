-- 0010: intent labels for every interaction, written by the curator (services/curator/labelling.py), so
-- intent diversity is plain SQL even for traffic that carries no label. source says where the label came
-- from: 'client' (the request's own label), 'teacher' (the intent, else the tool, the teacher's answer
-- names) or 'cluster' (the nearest centroid of the request's embedding, or a new cluster_NN). Keyed by
-- (agent_id, request_id): relabelling a request replaces its row (latest labelled_at wins).
CREATE TABLE IF NOT EXISTS intent_labels
(
    request_id   String,
    agent_id     LowCardinality(String),
    intent       String,
    source       LowCardinality(String),
    labelled_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(labelled_at)
ORDER BY (agent_id, request_id);

-- The effective intent of each interaction (one row per request_id): the client's label, else the label in
-- intent_labels, else the intent (or tool) the teacher's answer names; NULL until one of them exists.
CREATE VIEW IF NOT EXISTS interaction_intents AS
SELECT
    i.request_id AS request_id,
    i.agent_id AS agent_id,
    i.conversation_id AS conversation_id,
    i.received_at AS received_at,
    i.served_by AS served_by,
    coalesce(
        nullIf(i.intent, ''),
        nullIf(l.intent, ''),
        nullIf(JSONExtractString(ifNull(i.teacher_content, ''), 'intent'), ''),
        nullIf(JSONExtractString(ifNull(i.teacher_content, ''), 'tool'), ''),
        nullIf(JSONExtractString(i.teacher_tool_calls, 1, 'name'), '')
    ) AS intent,
    multiIf(
        nullIf(i.intent, '') IS NOT NULL, 'client',
        nullIf(l.intent, '') IS NOT NULL, l.source,
        intent IS NOT NULL, 'teacher',
        ''
    ) AS intent_source
FROM
(
    SELECT request_id, agent_id, conversation_id, received_at, served_by, intent, teacher_content, teacher_tool_calls
    FROM interactions
    ORDER BY request_id, inserted_at DESC
    LIMIT 1 BY request_id
) AS i
LEFT JOIN
(
    SELECT request_id, argMax(intent, labelled_at) AS intent, argMax(source, labelled_at) AS source
    FROM intent_labels
    GROUP BY request_id
) AS l ON i.request_id = l.request_id;
