-- External providers: when to poll a handed-off task, the secret of its attempt's callback URL.
ALTER TABLE tasks ADD COLUMN poll_at REAL;
ALTER TABLE tasks ADD COLUMN callback_nonce TEXT;
CREATE INDEX tasks_external ON tasks (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX tasks_polls ON tasks (poll_at) WHERE status = 'processing' AND poll_at IS NOT NULL;

-- Inbound webhooks: the ids already seen (de-duplication) and every delivery with its outcome.
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
