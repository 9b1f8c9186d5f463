-- A change of a task that leaves every indexed column as it was (a progress report, a stream's
-- positions, a renewed lease) may now be a heap-only update: PostgreSQL writes no index entry
-- for it and prunes the old versions within their page. None could be: every change sets the
-- task's seq, which an index held (the tasks with a notify_url, by seq, migration 0004), and a
-- change of any indexed column, whatever the index's WHERE, makes an update write every index.
-- It counts most while another transaction of the server (of any database) stays open, which
-- keeps every version of a row: a task reporting progress then grew an index entry per report
-- in six indexes, each read of it passing them all (docs/operations.md).
--
-- What that index answered (did a task with a notify_url end after the fan-out's cursor?) is
-- asked of the log instead, which is only ever added to: its end events of such tasks, by seq.
-- Its WHERE is the test of errands.notify.policy.notify_url_of.
DROP INDEX errands_tasks_notify_url;
CREATE INDEX errands_events_notify_url ON errands_events (seq)
    WHERE type IN ('task.completed', 'task.failed', 'task.timeout', 'task.cancelled')
      AND position('"notify_url":"'::bytea IN task) > 0;
