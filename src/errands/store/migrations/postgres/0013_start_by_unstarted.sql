-- start_within_s bounds a task's first start: a task given back after it started (a worker
-- shutting down, a provider asking to wait) has started, whatever its attempt count says.
DROP INDEX errands_tasks_start_by;
CREATE INDEX errands_tasks_start_by ON errands_tasks (start_by) WHERE status = 'pending' AND started_at IS NULL AND start_by IS NOT NULL;
