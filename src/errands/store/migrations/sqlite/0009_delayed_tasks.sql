-- Delayed tasks: a task that waits to be due (run_at, delay_s, a retry's backoff) leaves the
-- queue index, which then holds only tasks claimable since their creation; claims read the
-- tasks that came due from an index of their own, in queue order (priority, then the time they
-- came due). A task never started by start_by times out.
ALTER TABLE tasks ADD COLUMN start_by REAL;
DROP INDEX tasks_queue;
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'pending' AND run_after <= created_at;
CREATE INDEX tasks_start_by ON tasks (start_by) WHERE status = 'pending' AND attempt = 0 AND start_by IS NOT NULL;
CREATE INDEX tasks_due ON tasks (priority DESC, run_after, id) WHERE status = 'pending' AND run_after > created_at;
