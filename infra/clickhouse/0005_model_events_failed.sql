-- 0005: a training job that could not finish is recorded (ModelEvent kind `failed`, schema v2) with its error,
-- instead of disappearing from the lifecycle: the stage leaves `training`, the curator retries after more data,
-- and `flywheel models` shows it. Adding an Enum value is a metadata change: existing rows are untouched.
ALTER TABLE model_events MODIFY COLUMN kind
    Enum8('candidate' = 1, 'promoted' = 2, 'rejected' = 3, 'rolled_back' = 4, 'failed' = 5);
ALTER TABLE model_events ADD COLUMN IF NOT EXISTS error Nullable(String);
