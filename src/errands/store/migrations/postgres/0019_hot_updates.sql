-- A change of a task that sets its seq but leaves every indexed column as it was (a progress
-- report, a stream's positions) may now be a heap-only update: PostgreSQL writes no index entry
-- for it and prunes the old versions within their page. None could be: an index held the
-- task's seq (the tasks with a notify_url, by seq, migration 0004), and a change of any indexed
-- column, whatever the index's WHERE, makes an update write every index of the row. It counts
-- most while PostgreSQL must keep every version of a row (a transaction with an id open in any
-- database of the server, or any open transaction in errands'): a task reporting progress then
-- grew an entry per report in each of its five indexes, each read of it passing them all
-- (docs/operations.md).
--
-- What that index answered (did a task with a notify_url end after the fan-out's cursor?) is
-- asked of the log instead, whose rows are never changed (only added, and purged with their
-- task): its end events of such tasks, by seq. Its WHERE is the test of
-- errands.notify.policy.notify_url_of. (Built before the old index is dropped: the drop locks the
-- task table until the migration commits.)
CREATE INDEX errands_events_notify_url ON errands_events (seq)
    WHERE type IN ('task.completed', 'task.failed', 'task.timeout', 'task.cancelled')
      AND position('"notify_url":"'::bytea IN task) > 0;
DROP INDEX errands_tasks_notify_url;
