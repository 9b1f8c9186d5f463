-- The whole current schema, for fresh installs. The numbered migrations must build exactly this
-- (tests/integration/test_migrations.py checks it); change both together.

-- Tasks, the event log, tombstones of purged tasks and the service's own small state.
-- Times are seconds since the epoch (double precision); JSON is stored as text, snapshots as bytea.
-- Tables carry an errands_ prefix: the database may be shared with the application.

CREATE TABLE errands_tasks (
    id                text PRIMARY KEY,
    type              text NOT NULL,
    owner             text NOT NULL,
    status            text NOT NULL,
    input             text NOT NULL,
    priority          integer NOT NULL,
    max_attempts      integer NOT NULL,
    timeout_s         double precision NOT NULL,
    created_at        double precision NOT NULL,
    updated_at        double precision NOT NULL,
    expires_at        double precision NOT NULL,
    fingerprint       text NOT NULL,
    result            text,
    error_code        text,
    error_message     text,
    progress          integer NOT NULL DEFAULT 0,
    message           text,
    attempt           integer NOT NULL DEFAULT 0,
    external_id       text,
    webhook_received  boolean NOT NULL DEFAULT false,
    notification_sent boolean NOT NULL DEFAULT false,
    started_at        double precision,
    finished_at       double precision,
    seq               bigint NOT NULL,
    run_after         double precision NOT NULL,
    queued_at         double precision NOT NULL,
    lease_token       text,
    lease_expires_at  double precision,
    deadline_at       double precision,
    worker_id         text,
    manual_retries    integer NOT NULL DEFAULT 0
);

CREATE INDEX errands_tasks_queue ON errands_tasks (priority DESC, created_at, id) WHERE status = 'pending' AND run_after <= created_at;
CREATE INDEX errands_tasks_backoff ON errands_tasks (run_after) WHERE status = 'pending' AND run_after > created_at;
CREATE INDEX errands_tasks_running ON errands_tasks (type, owner) WHERE status = 'processing';
CREATE INDEX errands_tasks_pending_owner ON errands_tasks (owner) WHERE status = 'pending';
CREATE INDEX errands_tasks_owner_created ON errands_tasks (owner, created_at, id);
CREATE INDEX errands_tasks_created ON errands_tasks (created_at, id);
CREATE INDEX errands_tasks_unfinished_expiry ON errands_tasks (expires_at) WHERE status IN ('pending', 'processing');
CREATE INDEX errands_tasks_finished ON errands_tasks (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE errands_events (
    seq       bigint PRIMARY KEY,
    type      text NOT NULL,
    at        double precision NOT NULL,
    task_id   text NOT NULL,
    owner     text NOT NULL,
    task_type text NOT NULL,
    status    text NOT NULL,
    task      bytea NOT NULL
);
CREATE INDEX errands_events_task ON errands_events (task_id, seq);
-- seq = (id of the writing transaction) << 16 | (ordinal within it). Readers only read below the
-- oldest transaction still running, so an event is never skipped because it committed late.

CREATE TABLE errands_tombstones (
    id        text PRIMARY KEY,
    owner     text NOT NULL,
    purged_at double precision NOT NULL
);
CREATE INDEX errands_tombstones_purged ON errands_tombstones (purged_at);

CREATE TABLE errands_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE errands_admin_keys (
    hash       text PRIMARY KEY,
    created_at double precision NOT NULL
);

-- Resuming a watch of an owner's tasks reads that owner's events after a seq.
CREATE INDEX errands_events_owner ON errands_events (owner, seq);
-- The highest seq whose event was purged: a watch resuming from before it may have missed events.
INSERT INTO errands_meta (key, value) VALUES ('horizon', '0');

-- External providers: when to poll a handed-off task, the secret of its attempt's callback URL.
ALTER TABLE errands_tasks ADD COLUMN poll_at double precision;
ALTER TABLE errands_tasks ADD COLUMN callback_nonce text;
CREATE INDEX errands_tasks_external ON errands_tasks (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX errands_tasks_polls ON errands_tasks (poll_at) WHERE status = 'processing' AND poll_at IS NOT NULL;

-- Inbound webhooks: the ids already seen (de-duplication) and every delivery with its outcome.
CREATE TABLE errands_webhook_ids (
    provider    text NOT NULL,
    delivery_id text NOT NULL,
    received_at double precision NOT NULL,
    PRIMARY KEY (provider, delivery_id)
);
CREATE INDEX errands_webhook_ids_received ON errands_webhook_ids (received_at);

CREATE TABLE errands_webhook_deliveries (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    delivery_id text,
    task_id     text,
    outcome     text NOT NULL,
    status_code integer NOT NULL,
    received_at double precision NOT NULL,
    detail      text
);
CREATE INDEX errands_webhook_deliveries_task ON errands_webhook_deliveries (task_id, id);
CREATE INDEX errands_webhook_deliveries_received ON errands_webhook_deliveries (received_at);

-- Notifications: a task's own callback URL, the endpoints admins registered, one message per
-- event and destination (the outbox, filled from the event log), and every delivery attempt.
ALTER TABLE errands_tasks ADD COLUMN notify_url text;
-- No index of tasks holds seq, which every change sets: a change that leaves the indexed
-- columns as they were may then be a heap-only update (migration 0019). The end events of tasks
-- with a notify_url, by seq (what the fan-out skips the log on):
CREATE INDEX errands_events_notify_url ON errands_events (seq)
    WHERE type IN ('task.completed', 'task.failed', 'task.timeout', 'task.cancelled')
      AND position('"notify_url":"'::bytea IN task) > 0;

-- Output streams: where each stream of the current attempt stands.
ALTER TABLE errands_tasks ADD COLUMN stream_positions text;

-- Delayed tasks: start_within_s.
ALTER TABLE errands_tasks ADD COLUMN start_by double precision;
CREATE INDEX errands_tasks_due ON errands_tasks (priority DESC, run_after, id) WHERE status = 'pending' AND run_after > created_at;
CREATE INDEX errands_tasks_start_by ON errands_tasks (start_by) WHERE status = 'pending' AND started_at IS NULL AND start_by IS NOT NULL;

CREATE TABLE errands_endpoints (
    id                    text PRIMARY KEY,
    url                   text NOT NULL,
    description           text,
    events                text NOT NULL,
    types                 text,
    owners                text,
    secret                text NOT NULL,
    previous_secret       text,
    previous_secret_until double precision,
    enabled               boolean NOT NULL,
    disabled_reason       text,
    failing_since         double precision,
    throttled_until       double precision,
    created_at            double precision NOT NULL,
    updated_at            double precision NOT NULL
);

CREATE TABLE errands_messages (
    id          text PRIMARY KEY,
    seq         bigint NOT NULL,
    event_type  text NOT NULL,
    task_id     text NOT NULL,
    owner       text NOT NULL,
    task_type   text NOT NULL,
    channel     text NOT NULL,
    target      text NOT NULL,
    payload     bytea NOT NULL,
    final       boolean NOT NULL,
    state       text NOT NULL,
    attempts    integer NOT NULL,
    next_at     double precision NOT NULL,
    created_at  double precision NOT NULL,
    updated_at  double precision NOT NULL,
    last_status integer,
    last_error  text,
    lease_token text,
    UNIQUE (seq, channel, target)
);
CREATE INDEX errands_messages_due ON errands_messages (next_at) WHERE state = 'pending';
CREATE INDEX errands_messages_order ON errands_messages (task_id, channel, target, seq) WHERE state = 'pending';
CREATE INDEX errands_messages_task ON errands_messages (task_id, created_at);
CREATE INDEX errands_messages_target ON errands_messages (target, created_at);
CREATE INDEX errands_messages_finished ON errands_messages (updated_at) WHERE state != 'pending';

CREATE TABLE errands_message_attempts (
    id           bigserial PRIMARY KEY,
    message_id   text NOT NULL,
    channel      text NOT NULL,
    target       text NOT NULL,
    task_id      text NOT NULL,
    event_type   text NOT NULL,
    attempted_at double precision NOT NULL,
    succeeded    boolean NOT NULL,
    status_code  integer,
    latency_ms   double precision NOT NULL,
    response     text,
    error        text
);
CREATE INDEX errands_message_attempts_target ON errands_message_attempts (target, id);
CREATE INDEX errands_message_attempts_message ON errands_message_attempts (message_id, id);
CREATE INDEX errands_message_attempts_time ON errands_message_attempts (attempted_at);

-- Events up to this seq have been turned into messages (an upgraded database starts now).
INSERT INTO errands_meta (key, value) SELECT 'notify_cursor', coalesce(max(seq), 0)::text FROM errands_events;

-- Which events a reader may read: every event below errands_log_bound() was written by a
-- transaction that has ended. The bound is the oldest transaction still running in a session of
-- errands' own (application_name 'errands', which errands gives each of its connections) on
-- this database, or, when there is none, the first transaction id not yet assigned: transactions
-- of other applications, and of other databases, hold nothing back.
--
-- Why it is safe. An event's seq is (its transaction's id) << 16 | (its ordinal). The snapshot is
-- taken before the sessions are read, so a transaction with an id below its xmax had its id when
-- the sessions were read: it was either still running there, and lowers the bound, or it had
-- ended. The events are then read with a fresh snapshot (READ COMMITTED, a VOLATILE function),
-- which sees every transaction below the bound as ended, and so everything they committed.
--
-- The sessions (pg_stat_activity, a read whose cost grows with every session of the server) are
-- read only when nothing cheaper answers: each session remembers the running transactions it
-- has found to be another application's (errands_foreign), and the bound of the oldest running
-- transaction not known to be foreign reads the same events when every event lies below it.

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

-- What only pg_stat_activity tells: which transactions running at ``snap`` are errands'. Returns
-- the oldest of errands' (NULL when none) and remembers the others as foreign. The snapshot is
-- taken before the sessions are read.
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

CREATE FUNCTION errands_log_bound() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
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

-- What precedes the events of the running transaction, whose seq base is ``base`` (its id << 16):
-- the last seq below it, when no older transaction of errands' is still running (then every
-- event below ``base`` has been committed, and a statement run now sees them all); otherwise
-- NULL. Each statement that writes events returns it, and a hub that has delivered up to it
-- takes the events at once, without reading the log (docs/architecture.md). While an older
-- transaction not known to be another application's runs, the sessions tell, unless the last
-- look at them, less than 20 ms ago, found an older one of errands' (then NULL, unread).
CREATE FUNCTION errands_after(base bigint) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
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

CREATE TABLE errands_schedules (
    name         text PRIMARY KEY,
    definition   text NOT NULL,
    source       text NOT NULL,
    paused       integer NOT NULL DEFAULT 0,
    next_at      double precision,
    last_slot    double precision,
    last_task_id text,
    created_at   double precision NOT NULL,
    updated_at   double precision NOT NULL
);
CREATE INDEX errands_schedules_due ON errands_schedules (next_at) WHERE paused = 0;

ALTER TABLE errands_tasks ADD COLUMN limit_key text;
CREATE TABLE errands_flow_rates (
    scope text PRIMARY KEY,
    tat   double precision NOT NULL
);

ALTER TABLE errands_tasks ADD COLUMN debounce_key text;
CREATE INDEX errands_tasks_debounce ON errands_tasks (owner, type, debounce_key) WHERE status = 'pending' AND debounce_key IS NOT NULL;

ALTER TABLE errands_tasks ADD COLUMN cost bigint NOT NULL DEFAULT 0;
CREATE TABLE errands_credit_balances (
    owner      text PRIMARY KEY,
    balance    bigint NOT NULL,
    reserved   bigint NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE errands_credit_ledger (
    id       bigserial PRIMARY KEY,
    owner    text NOT NULL,
    kind     text NOT NULL,
    amount   bigint NOT NULL,
    held     bigint NOT NULL,
    balance  bigint NOT NULL,
    reserved bigint NOT NULL,
    at       double precision NOT NULL,
    task_id  text,
    note     text
);
CREATE INDEX errands_credit_ledger_owner ON errands_credit_ledger (owner, id);
CREATE TABLE errands_usage_days (
    day     text NOT NULL,
    owner   text NOT NULL,
    type    text NOT NULL,
    status  text NOT NULL,
    tasks   bigint NOT NULL,
    credits bigint NOT NULL,
    PRIMARY KEY (day, owner, type, status)
);
CREATE INDEX errands_usage_days_owner ON errands_usage_days (owner, day);
