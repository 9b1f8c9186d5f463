-- Credits (errands.model.credits): a task's cost, each owner's balance and reserved credits,
-- and the ledger of every move, written with the change of the task that made it.
ALTER TABLE tasks ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;

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
