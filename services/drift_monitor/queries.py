# ruff: noqa: S608 - the f-strings join constant fragments; every value is a ClickHouse query parameter
"""The drift monitor's SQL (ClickHouse), in one place so docs/drift.md shows the same text and every
RetrainTriggered carries the query that produced its figures.

Each window query reads one agent's ``interactions`` received in ``[{start}, {end})``, one row per request_id
(``LIMIT 1 BY request_id``: a replayed request never counts twice, even before the ReplacingMergeTree
merges). The monitor passes times as strings with microseconds (``param_time``): clickhouse-connect binds a
``datetime`` to whole seconds, which would let traffic served just before a promotion into its window.
"""

from __future__ import annotations

from datetime import datetime

from services.core.clickhouse import param_time
from services.curator.queries import EFFECTIVE_INTENT


def _window(columns: str) -> str:
    return f"""
    SELECT {columns}
    FROM interactions
    WHERE agent_id = {{agent:String}}
      AND received_at >= {{start:DateTime64(6, 'UTC')}}
      AND received_at < {{end:DateTime64(6, 'UTC')}}
    ORDER BY request_id, inserted_at DESC
    LIMIT 1 BY request_id"""


# Shadow samples: the student served and the teacher answered the same request in the background. The monitor
# judges each pair with the trainer's holdout comparison (services/trainer/evaluate.py ``agrees``: same intent,
# tool and arguments), so live agreement is measured exactly as the validation agreement it is compared with.
SHADOW_PAIRS_SQL = f"""
SELECT request_id, teacher_content, student_content
FROM ({
    _window(
        "request_id, shadow, teacher_ran, student_ran, teacher_error, student_error, teacher_content, student_content"
    )
})
WHERE shadow AND teacher_ran AND student_ran AND teacher_error IS NULL AND student_error IS NULL
ORDER BY request_id
"""

# Student-eligible traffic (the student was asked) and how much of it fell back to the teacher because the
# student was unsure (route_reason 'low_confidence', services/router/routing.py); student failures beside it.
FALLBACK_SQL = f"""
SELECT
    count() AS student_eligible,
    countIf(route_reason = 'low_confidence') AS low_confidence,
    countIf(route_reason = 'student_error') AS student_errors
FROM ({_window("request_id, student_ran, route_reason")})
WHERE student_ran
"""

# Requests per effective intent (the client's label, else the curator's label in intent_labels, else the
# intent or tool the teacher's answer names: the interaction_intents view's rule, filtered to the window
# first, and only the window's labels read). intent IS NULL: not labelled yet (a student-only answer the
# curator has not clustered).
INTENTS_SQL = f"""
SELECT {EFFECTIVE_INTENT} AS intent, count() AS requests
FROM ({_window("request_id, intent, teacher_content, teacher_tool_calls")}) AS i
LEFT JOIN (
    SELECT request_id, argMax(intent, labelled_at) AS label
    FROM intent_labels
    WHERE agent_id = {{agent:String}}
      AND request_id IN (
        SELECT request_id FROM interactions
        WHERE agent_id = {{agent:String}}
          AND received_at >= {{start:DateTime64(6, 'UTC')}}
          AND received_at < {{end:DateTime64(6, 'UTC')}})
    GROUP BY request_id
) AS l ON i.request_id = l.request_id
GROUP BY intent
ORDER BY requests DESC, intent
"""

# The intents the promoted model was trained on: its snapshot's per-intent counts (the snapshot id is on the
# promotion's ModelEvent and in its lineage).
TRAINED_INTENTS_SQL = """
SELECT intent_counts
FROM datasets FINAL
WHERE agent_id = {agent:String} AND snapshot_id = {snapshot:String}
ORDER BY created_at DESC
LIMIT 1
"""


def window_parameters(agent_id: str, start: datetime, end: datetime) -> dict[str, str]:
    return {"agent": agent_id, "start": param_time(start), "end": param_time(end)}
