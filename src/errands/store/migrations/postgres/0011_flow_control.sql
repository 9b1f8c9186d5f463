-- Flow control (errands.model.flow): the key a task counts under for per-key limits, and each
-- rate-limited scope's theoretical arrival time.
ALTER TABLE errands_tasks ADD COLUMN limit_key text;

CREATE TABLE errands_flow_rates (
    scope text PRIMARY KEY,
    tat   double precision NOT NULL
);
