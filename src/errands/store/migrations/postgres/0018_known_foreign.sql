-- The log's bound (errands_log_bound) and what precedes a commit's events (errands_after) read
-- pg_stat_activity only when nothing cheaper answers. That read tells errands' transactions
-- from other applications' (migration 0007), and its cost grows with every session of the
-- server, errands' or not (100 µs more a call at 90 idle sessions, docs/benchmarks.md): every
-- statement that wrote events paid it whenever an older transaction was still running, which
-- under load is most of the time, and mostly one of errands' own.
--
-- Now each session remembers the running transactions it has found to be another
-- application's (errands_foreign), and:
--   * errands_log_bound tries, after the bound of the server's oldest transaction, the bound
--     of the oldest running transaction not known to be foreign: when every event lies below
--     it, the read it allows is the same. Else it reads the sessions (errands_classify), as
--     before, and remembers what it learnt;
--   * errands_after, while an older transaction not known to be foreign still runs, reads the
--     sessions (and learns) unless the last time it read them, less than 20 ms ago, they showed
--     an older one of errands': then it returns NULL unread, which is what reading them would
--     most likely have given (under load, the older transactions are mostly errands' own). So a
--     session reads them at most 50 times a second while errands' own transactions overlap,
--     and, as before, at each commit that only other applications' transactions precede, until
--     it knows them. A NULL only makes the hubs read the log (as they always may); it never
--     lets one skip an event.

-- The transactions running at the snapshot ``snap`` that this session has found to be another
-- application's: a transaction id is never reused, so one found running in no session of
-- errands' never is errands'. Kept in the setting errands.foreign (ids, comma-separated); those
-- the snapshot shows ended are forgotten. (Its callers look at the setting first: when it is
-- empty, they know nothing and need not call it.)
CREATE FUNCTION errands_foreign(snap pg_snapshot) RETURNS bigint[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    kept bigint[] := string_to_array(nullif(current_setting('errands.foreign', true), ''), ',')::bigint[];
    known bigint[];
BEGIN
    known := ARRAY(SELECT k FROM unnest(kept) AS k WHERE NOT pg_visible_in_snapshot(k::text::xid8, snap));
    IF cardinality(known) < cardinality(kept) THEN
        PERFORM set_config('errands.foreign', array_to_string(known, ','), false);
    END IF;
    RETURN known;
END
$$;

-- What only pg_stat_activity tells: which transactions running at ``snap`` are errands' (its
-- sessions on this database, application_name 'errands'). Returns the oldest of errands' (NULL
-- when none) and remembers the others as foreign, besides those ``known`` already (see
-- errands_foreign; one that has ended since the snapshot is forgotten at the next). The
-- snapshot is taken before the sessions are read: a transaction with an id below its xmax had
-- its id when they were read, so it was either still running there or had ended.
CREATE FUNCTION errands_classify(snap pg_snapshot, known bigint[]) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    next_xid bigint := pg_snapshot_xmax(snap)::text::bigint;
    oldest bigint;
    found bigint[];
BEGIN
    -- pg_stat_activity is copied once per transaction: read it afresh.
    PERFORM pg_stat_clear_snapshot();
    -- backend_xid has 32 bits: each is a distance back from next_xid (wrap-around included).
    -- A transaction that got its id after the snapshot is ahead of next_xid (a "negative"
    -- distance, 2^31 or more here): the bound is below it anyway, so it is left out.
    WITH ours AS (
        SELECT next_xid - s.back AS id
        FROM (SELECT (next_xid - a.backend_xid::text::bigint) & 4294967295 AS back
              FROM pg_stat_activity a
              WHERE a.datname = current_database() AND a.application_name = 'errands'
                AND a.backend_xid IS NOT NULL) s
        WHERE s.back < 2147483648
    )
    SELECT (SELECT min(id) FROM ours),
           ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(snap) AS x
                 WHERE x::text::bigint NOT IN (SELECT id FROM ours) AND x::text::bigint <> ALL (known))
    INTO oldest, found;
    IF cardinality(found) > 0 THEN
        PERFORM set_config('errands.foreign', array_to_string(known || found, ','), false);
    END IF;
    RETURN oldest;
END
$$;

CREATE OR REPLACE FUNCTION errands_log_bound() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    snap pg_snapshot;
    top bigint;
    known bigint[];
    unknown bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'errands reads its event log under READ COMMITTED only';
    END IF;
    snap := pg_current_snapshot();
    -- The cheap bound first: below the oldest transaction of the whole server nothing can
    -- appear later either, and when every event lies below it (an idle or lightly loaded
    -- log), it reads the same events. (max(seq) is read after the snapshot was taken.)
    top := coalesce((SELECT max(e.seq) FROM errands_events e), 0);
    IF top < pg_snapshot_xmin(snap)::text::bigint << 16 THEN
        RETURN pg_snapshot_xmin(snap)::text::bigint << 16;
    END IF;
    -- Then the oldest running transaction not known to be another application's: every one
    -- below it has ended or is foreign, and when every event lies below it, the read is the same.
    -- (A caller's own id, if it has one, is not among the snapshot's running ones: it counts.)
    known := CASE WHEN current_setting('errands.foreign', true) <> '' THEN errands_foreign(snap) ELSE '{}' END;
    IF cardinality(known) > 0 THEN
        SELECT least(coalesce(min(x::text::bigint), pg_snapshot_xmax(snap)::text::bigint),
                     pg_current_xact_id_if_assigned()::text::bigint)
        INTO unknown
        FROM pg_snapshot_xip(snap) AS x WHERE x::text::bigint <> ALL (known);
        IF top < unknown << 16 THEN
            RETURN unknown << 16;
        END IF;
    END IF;
    RETURN least(pg_snapshot_xmax(snap)::text::bigint, errands_classify(snap, known)) << 16;
END
$$;

CREATE OR REPLACE FUNCTION errands_after(base bigint) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    snap pg_snapshot := pg_current_snapshot();
    own bigint := base >> 16;
    known bigint[];
    older bigint;
    probe text[];
    now_s float8;
BEGIN
    -- A transaction that took its id after the snapshot and before this one's may still run,
    -- and the snapshot cannot tell.
    IF pg_snapshot_xmax(snap)::text::bigint < own THEN
        RETURN NULL;
    END IF;
    -- Older transactions still run.
    IF pg_snapshot_xmin(snap)::text::bigint < own THEN
        known := CASE WHEN current_setting('errands.foreign', true) <> '' THEN errands_foreign(snap) ELSE '{}' END;
        SELECT min(x::text::bigint) INTO older FROM pg_snapshot_xip(snap) AS x
        WHERE x::text::bigint < own AND x::text::bigint <> ALL (known);
        IF older IS NOT NULL THEN
            -- One not known to be another application's. When the last look at the sessions
            -- (errands.probe: when, and what it found older) found one of errands' within the
            -- last 20 ms, this is most likely one too: NULL, unread. Else the sessions tell.
            probe := string_to_array(current_setting('errands.probe', true), ',');
            now_s := extract(epoch FROM clock_timestamp());
            IF probe[2] = 'errands' AND now_s - probe[1]::float8 < 0.02 THEN
                RETURN NULL;
            END IF;
            older := errands_classify(snap, known);
            PERFORM set_config('errands.probe', now_s || CASE WHEN older < own THEN ',errands' ELSE ',foreign' END, false);
            IF older < own THEN
                RETURN NULL;  -- one of errands' (the others are known now)
            END IF;
        END IF;
    END IF;
    RETURN coalesce((SELECT max(e.seq) FROM errands_events e WHERE e.seq < base), 0);
END
$$;
