-- The whole current schema, for fresh installs. The numbered migrations must build exactly this
-- (tests/integration/test_migrations.py checks it); change both together.
-- (SQLite keeps ALTER TABLE results as edited CREATE TABLE text, hence the layout.)


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
, poll_at REAL, callback_nonce TEXT, notify_url TEXT, stream_positions TEXT, start_by REAL, limit_key TEXT, debounce_key TEXT, cost INTEGER NOT NULL DEFAULT 0);

CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'pending' AND run_after <= created_at;

CREATE INDEX tasks_due ON tasks (priority DESC, run_after, id) WHERE status = 'pending' AND run_after > created_at;

CREATE INDEX tasks_start_by ON tasks (start_by) WHERE status = 'pending' AND started_at IS NULL AND start_by IS NOT NULL;

CREATE INDEX tasks_backoff ON tasks (run_after) WHERE status = 'pending' AND run_after > created_at;

CREATE INDEX tasks_running ON tasks (type, owner) WHERE status = 'processing';

CREATE INDEX tasks_pending_owner ON tasks (owner) WHERE status = 'pending';

CREATE INDEX tasks_owner_created ON tasks (owner, created_at, id);

CREATE INDEX tasks_created ON tasks (created_at, id);

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

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE admin_keys (
    hash       TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);

CREATE INDEX events_owner ON events (owner, seq);

CREATE INDEX tasks_external ON tasks (external_id) WHERE external_id IS NOT NULL;

CREATE INDEX tasks_polls ON tasks (poll_at) WHERE status = 'processing' AND poll_at IS NOT NULL;

CREATE TABLE webhook_ids (
    provider    TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (provider, delivery_id)
);

CREATE INDEX webhook_ids_received ON webhook_ids (received_at);

CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    provider    TEXT NOT NULL,
    delivery_id TEXT,
    task_id     TEXT,
    outcome     TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    received_at REAL NOT NULL,
    detail      TEXT
);

CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id, id);

CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);

CREATE INDEX tasks_notify_url ON tasks (seq) WHERE notify_url IS NOT NULL;

CREATE TABLE endpoints (
    id                    TEXT PRIMARY KEY,
    url                   TEXT NOT NULL,
    description           TEXT,
    events                TEXT NOT NULL,
    types                 TEXT,
    owners                TEXT,
    secret                TEXT NOT NULL,
    previous_secret       TEXT,
    previous_secret_until REAL,
    enabled               INTEGER NOT NULL,
    disabled_reason       TEXT,
    failing_since         REAL,
    throttled_until       REAL,
    created_at            REAL NOT NULL,
    updated_at            REAL NOT NULL
);

CREATE TABLE messages (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    event_type  TEXT NOT NULL,
    task_id     TEXT NOT NULL,
    owner       TEXT NOT NULL,
    task_type   TEXT NOT NULL,
    channel     TEXT NOT NULL,
    target      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    final       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    next_at     REAL NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    lease_token TEXT,
    UNIQUE (seq, channel, target)
);

CREATE INDEX messages_due ON messages (next_at) WHERE state = 'pending';

CREATE INDEX messages_order ON messages (task_id, channel, target, seq) WHERE state = 'pending';

CREATE INDEX messages_task ON messages (task_id, created_at);

CREATE INDEX messages_target ON messages (target, created_at);

CREATE INDEX messages_finished ON messages (updated_at) WHERE state != 'pending';

CREATE TABLE message_attempts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT NOT NULL,
    channel      TEXT NOT NULL,
    target       TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    attempted_at REAL NOT NULL,
    succeeded    INTEGER NOT NULL,
    status_code  INTEGER,
    latency_ms   REAL NOT NULL,
    response     TEXT,
    error        TEXT
);

CREATE INDEX message_attempts_target ON message_attempts (target, id);

CREATE INDEX message_attempts_message ON message_attempts (message_id, id);

CREATE INDEX message_attempts_time ON message_attempts (attempted_at);

CREATE TABLE schedules (
    name         TEXT PRIMARY KEY,
    definition   TEXT NOT NULL,
    source       TEXT NOT NULL,
    paused       INTEGER NOT NULL DEFAULT 0,
    next_at      REAL,
    last_slot    REAL,
    last_task_id TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);

CREATE INDEX schedules_due ON schedules (next_at) WHERE paused = 0;

CREATE TABLE flow_rates (
    scope TEXT PRIMARY KEY,
    tat   REAL NOT NULL
);

CREATE INDEX tasks_debounce ON tasks (owner, type, debounce_key) WHERE status = 'pending' AND debounce_key IS NOT NULL;

CREATE TABLE credit_balances (
    owner      TEXT PRIMARY KEY,
    balance    INTEGER NOT NULL,
    reserved   INTEGER NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE credit_ledger (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    owner    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    amount   INTEGER NOT NULL,
    held     INTEGER NOT NULL,
    balance  INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    at       REAL NOT NULL,
    task_id  TEXT,
    note     TEXT
);

CREATE INDEX credit_ledger_owner ON credit_ledger (owner, id);

CREATE TABLE usage_days (
    day     TEXT NOT NULL,
    owner   TEXT NOT NULL,
    type    TEXT NOT NULL,
    status  TEXT NOT NULL,
    tasks   INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    PRIMARY KEY (day, owner, type, status)
);

CREATE INDEX usage_days_owner ON usage_days (owner, day);

INSERT INTO meta (key, value) VALUES ('horizon', '0');

INSERT INTO meta (key, value) VALUES ('notify_cursor', '0');

INSERT INTO meta (key, value) VALUES ('seq', '0');
