-- Which events a reader may read: every event below errands_log_bound() was written by a
-- transaction that has ended. The bound is the oldest transaction still running in a session of
-- errands' own (application_name 'errands', which errands gives each of its connections) on
-- this database, or, when there is none, the first transaction id not yet assigned: transactions
-- of other applications, and of other databases, hold nothing back. (Until now the bound was
-- the oldest transaction of the whole server, which any foreign write held back.)
--
-- Why it is safe. An event's seq is (its transaction's id) << 16 | (its ordinal). The snapshot is
-- taken before the sessions are read, so a transaction with an id below its xmax had its id when
-- the sessions were read: it was either still running there, and lowers the bound, or it had
-- ended. The events are then read with a fresh snapshot (READ COMMITTED, a VOLATILE function),
-- which sees every transaction below the bound as ended, and so everything they committed.
CREATE FUNCTION errands_log_bound() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    snap pg_snapshot;
    next_xid bigint;
    oldest bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'errands reads its event log under READ COMMITTED only';
    END IF;
    snap := pg_current_snapshot();
    -- The cheap bound first: below the oldest transaction of the whole server nothing can
    -- appear later either, and when every event lies below it (an idle or lightly loaded
    -- log), it reads the same events. (max(seq) is read after the snapshot was taken.)
    IF coalesce((SELECT max(e.seq) FROM errands_events e), 0) < pg_snapshot_xmin(snap)::text::bigint << 16 THEN
        RETURN pg_snapshot_xmin(snap)::text::bigint << 16;
    END IF;
    -- pg_stat_activity is copied once per transaction: read it afresh.
    PERFORM pg_stat_clear_snapshot();
    next_xid := pg_snapshot_xmax(snap)::text::bigint;
    -- backend_xid has 32 bits: each is a distance back from next_xid (wrap-around included).
    -- A transaction that got its id after the snapshot is ahead of next_xid (a "negative"
    -- distance, 2^31 or more here): the bound is below it anyway, so it is left out.
    SELECT min(next_xid - s.back) INTO oldest
    FROM (SELECT (next_xid - a.backend_xid::text::bigint) & 4294967295 AS back
          FROM pg_stat_activity a
          WHERE a.datname = current_database() AND a.application_name = 'errands'
            AND a.backend_xid IS NOT NULL) s
    WHERE s.back < 2147483648;
    RETURN least(next_xid, oldest) << 16;
END
$$;

-- The committed events after a seq, below the bound, and in every row whether events wait above
-- it (one row of NULLs and the flag when none can be read): what every hub reads after commits.
CREATE FUNCTION errands_log(after bigint, most integer, with_task boolean)
RETURNS TABLE (seq bigint, type text, at double precision, task_id text, owner text,
               task_type text, status text, task bytea, behind boolean)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    bound bigint := errands_log_bound();
    waiting boolean;
BEGIN
    -- max(seq) is one step down the primary key.
    waiting := coalesce((SELECT max(e.seq) FROM errands_events e) >= bound, false);
    RETURN QUERY
        SELECT e.seq, e.type, e.at, e.task_id, e.owner, e.task_type, e.status,
               CASE WHEN with_task THEN e.task END, waiting
        FROM errands_events e WHERE e.seq > after AND e.seq < bound ORDER BY e.seq LIMIT most;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::float8, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::bytea, waiting;
    END IF;
END
$$;

-- The committed events of a few tasks (each after its own seq), below the same bound, without
-- snapshots, and whether some of theirs wait above it: what a worker process reads of the log
-- (the tasks it runs), instead of all of it.
CREATE FUNCTION errands_task_log(ids text[], afters bigint[], most integer)
RETURNS TABLE (seq bigint, type text, at double precision, task_id text, owner text,
               task_type text, status text, task bytea, behind boolean)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    bound bigint := errands_log_bound();
    waiting boolean;
BEGIN
    waiting := EXISTS (SELECT 1 FROM unnest(ids) AS f(id)
                       JOIN errands_events e ON e.task_id = f.id AND e.seq >= bound);
    RETURN QUERY
        SELECT e.seq, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, NULL::bytea, waiting
        FROM unnest(ids, afters) AS f(id, after)
        JOIN errands_events e ON e.task_id = f.id AND e.seq > f.after AND e.seq < bound
        ORDER BY e.seq LIMIT most;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::float8, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::bytea, waiting;
    END IF;
END
$$;
