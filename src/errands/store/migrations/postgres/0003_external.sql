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
