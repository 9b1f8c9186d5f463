-- Schedules (cron): each submits a task per slot; next_at is the next slot, moved on with a
-- compare-and-set as a node fires it (errands.model.schedules).
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
