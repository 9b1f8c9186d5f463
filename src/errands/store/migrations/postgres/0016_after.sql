-- What precedes the events of the running transaction, whose seq base is ``base`` (its id << 16):
-- the last seq below it, when no older transaction of errands' is still running (then every
-- event below ``base`` has been committed, and a statement run now sees them all); otherwise
-- NULL. Each statement that writes events returns it, and a hub that has delivered up to it
-- takes the events at once, without reading the log (docs/architecture.md).
--
-- The cheap test first: this transaction is the oldest running on the whole server (the
-- snapshot counts its own id). Else the one errands_log_bound() makes, from errands' own
-- sessions (migration 0007): a foreign transaction holds nothing back here either. The events
-- are then read with a fresh snapshot (READ COMMITTED, a VOLATILE function), taken after both.
CREATE FUNCTION errands_after(base bigint) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16) <> base
       AND errands_log_bound() <> base THEN
        RETURN NULL;
    END IF;
    RETURN coalesce((SELECT max(e.seq) FROM errands_events e WHERE e.seq < base), 0);
END
$$;
