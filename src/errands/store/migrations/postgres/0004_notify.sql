-- Notifications: a task's own callback URL, the endpoints admins registered, one message per
-- event and destination (the outbox, filled from the event log), and every delivery attempt.
ALTER TABLE errands_tasks ADD COLUMN notify_url text;
CREATE INDEX errands_tasks_notify_url ON errands_tasks (seq) WHERE notify_url IS NOT NULL;

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
