"""SQL fragments shared by the services' ClickHouse queries over ``interactions`` (the dashboard, the demo's
report), so that every figure called "agreement" means the same thing as the cookbook's ``shadow_agreement``
(docs/sql.md) and the trainer's ``evaluate.agrees``."""

from __future__ import annotations

# Same intent, tool and arguments (key by key); a student answer that is not valid JSON disagrees. A WITH
# clause body: defines teacher_answer, student_answer and agree.
AGREE = """
    ifNull(teacher_content, '') AS teacher_answer,
    ifNull(student_content, '') AS student_answer,
    isValidJSON(student_answer)
        AND JSONExtractString(teacher_answer, 'intent') = JSONExtractString(student_answer, 'intent')
        AND JSONExtractString(teacher_answer, 'tool') = JSONExtractString(student_answer, 'tool')
        AND arraySort(JSONExtractKeysAndValuesRaw(teacher_answer, 'arguments'))
            = arraySort(JSONExtractKeysAndValuesRaw(student_answer, 'arguments')) AS agree"""

# A shadow sample: the student served and the teacher answered the same request, both without error.
SHADOW_SAMPLE = "shadow AND teacher_ran AND student_ran AND teacher_error IS NULL AND student_error IS NULL"
