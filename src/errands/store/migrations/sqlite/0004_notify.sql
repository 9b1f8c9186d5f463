-- Notifications: a task's own callback URL, the endpoints admins registered, one message per
-- event and destination (the outbox, filled from the event log), and every delivery attempt.
ALTER TABLE tasks ADD COLUMN notify_url TEXT;
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

-- Events up to this seq have been turned into messages (an upgraded database starts now).
INSERT INTO meta (key, value) SELECT 'notify_cursor', value FROM meta WHERE key = 'seq';
