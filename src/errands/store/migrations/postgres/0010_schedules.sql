-- Schedules (cron): each submits a task per slot; next_at is the next slot, moved on with a
-- compare-and-set as a node fires it (errands.model.schedules).
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
