-- Flow control (errands.model.flow): the key a task counts under for per-key limits, and each
-- rate-limited scope's theoretical arrival time.
ALTER TABLE tasks ADD COLUMN limit_key TEXT;

CREATE TABLE flow_rates (
    scope TEXT PRIMARY KEY,
    tat   REAL NOT NULL
);
