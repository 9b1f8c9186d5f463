-- The whole current schema, for fresh installs. The numbered migrations must build exactly this
-- (tests/integration/test_migrations.py checks it); change both together.

-- Tasks, the event log, tombstones of purged tasks and the service's own small state.
-- Times are seconds since the epoch (REAL); JSON is stored as text, events' task snapshots as blobs.

CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    type              TEXT NOT NULL,
    owner             TEXT NOT NULL,
    status            TEXT NOT NULL,
    input             TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    timeout_s         REAL NOT NULL,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    expires_at        REAL NOT NULL,
    fingerprint       TEXT NOT NULL,
    result            TEXT,
    error_code        TEXT,
    error_message     TEXT,
    progress          INTEGER NOT NULL DEFAULT 0,
    message           TEXT,
    attempt           INTEGER NOT NULL DEFAULT 0,
    external_id       TEXT,
    webhook_received  INTEGER NOT NULL DEFAULT 0,
    notification_sent INTEGER NOT NULL DEFAULT 0,
    started_at        REAL,
    finished_at       REAL,
    seq               INTEGER NOT NULL,
    run_after         REAL NOT NULL,
    queued_at         REAL NOT NULL,
    lease_token       TEXT,
    lease_expires_at  REAL,
    deadline_at       REAL,
    worker_id         TEXT,
    manual_retries    INTEGER NOT NULL DEFAULT 0
);

-- The queue: claim by priority, then age.
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'pending';
-- Tasks waiting out a retry backoff (fresh tasks are ready at once: run_after = created_at).
CREATE INDEX tasks_backoff ON tasks (run_after) WHERE status = 'pending' AND run_after > created_at;
-- Running tasks: leases, deadlines and per-owner concurrency.
CREATE INDEX tasks_running ON tasks (type, owner) WHERE status = 'processing';
-- Pending tasks per owner (max_pending_per_owner).
CREATE INDEX tasks_pending_owner ON tasks (owner) WHERE status = 'pending';
-- Listing, newest first, per owner and for admins.
CREATE INDEX tasks_owner_created ON tasks (owner, created_at DESC, id DESC);
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);
-- Sweeping: unfinished tasks by expiry, finished tasks by age.
CREATE INDEX tasks_unfinished_expiry ON tasks (expires_at) WHERE status IN ('pending', 'processing');
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY,
    type      TEXT NOT NULL,
    at        REAL NOT NULL,
    task_id   TEXT NOT NULL,
    owner     TEXT NOT NULL,
    task_type TEXT NOT NULL,
    status    TEXT NOT NULL,
    task      BLOB NOT NULL
);
CREATE INDEX events_task ON events (task_id, seq);

CREATE TABLE tombstones (
    id        TEXT PRIMARY KEY,
    owner     TEXT NOT NULL,
    purged_at REAL NOT NULL
);
CREATE INDEX tombstones_purged ON tombstones (purged_at);

-- Key/value state: the event counter ('seq'), the token-signing secret.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('seq', '0');

CREATE TABLE admin_keys (
    hash       TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);

-- Resuming a watch of an owner's tasks reads that owner's events after a seq.
CREATE INDEX events_owner ON events (owner, seq);
-- The highest seq whose event was purged: a watch resuming from before it may have missed events.
INSERT INTO meta (key, value) VALUES ('horizon', '0');
