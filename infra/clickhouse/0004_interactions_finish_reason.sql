-- 0004: the teacher's finish_reason (Interaction.teacher.finish_reason), so the curator's not_final filter
-- can drop answers the teacher did not finish (`length`: cut off at max_tokens; `content_filter`...) instead
-- of learning from them (services/curator/filters.py). NULL when the teacher did not run, or did not say
-- (rows written before this migration, servers that send no finish_reason): those are not judged.
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS teacher_finish_reason LowCardinality(Nullable(String))
    AFTER teacher_error;
