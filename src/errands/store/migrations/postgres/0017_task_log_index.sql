-- errands_task_log (what a worker process reads of the log: the events of the tasks it runs)
-- reads each task's events through that task's entries of the task index, one LATERAL step per
-- task. While the log had no statistics (a young database, until autovacuum first analyses
-- it), its test of whether events wait above the bound was planned as a hash join over a
-- sequential scan of the whole log: 2 ms a read at 30,000 events, and growing with the log.
CREATE OR REPLACE FUNCTION errands_task_log(ids text[], afters bigint[], most integer)
RETURNS TABLE (seq bigint, type text, at double precision, task_id text, owner text,
               task_type text, status text, task bytea, behind boolean)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    bound bigint := errands_log_bound();
    waiting boolean;
BEGIN
    -- Each task's events are read through its own entries of the task index, in seq order (a
    -- LATERAL step per task): wherever the plan guesses the bound lies, it never reads the
    -- whole log.
    waiting := EXISTS (SELECT 1 FROM unnest(ids) AS f(id)
                       CROSS JOIN LATERAL (SELECT 1 FROM errands_events e
                                           WHERE e.task_id = f.id AND e.seq >= bound LIMIT 1) w);
    RETURN QUERY
        SELECT e.seq, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, NULL::bytea, waiting
        FROM unnest(ids, afters) AS f(id, after)
        CROSS JOIN LATERAL (SELECT e.seq, e.type, e.at, e.task_id, e.owner, e.task_type, e.status
                            FROM errands_events e
                            WHERE e.task_id = f.id AND e.seq > f.after AND e.seq < bound
                            ORDER BY e.seq LIMIT most) e
        ORDER BY e.seq LIMIT most;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::float8, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::bytea, waiting;
    END IF;
END
$$;
