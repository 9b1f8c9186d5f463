-- Credits (errands.model.credits): a task's cost, each owner's balance and reserved credits,
-- and the ledger of every move, written with the change of the task that made it.
ALTER TABLE errands_tasks ADD COLUMN cost bigint NOT NULL DEFAULT 0;
CREATE TABLE errands_credit_balances (
    owner      text PRIMARY KEY,
    balance    bigint NOT NULL,
    reserved   bigint NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE errands_credit_ledger (
    id       bigserial PRIMARY KEY,
    owner    text NOT NULL,
    kind     text NOT NULL,
    amount   bigint NOT NULL,
    held     bigint NOT NULL,
    balance  bigint NOT NULL,
    reserved bigint NOT NULL,
    at       double precision NOT NULL,
    task_id  text,
    note     text
);
CREATE INDEX errands_credit_ledger_owner ON errands_credit_ledger (owner, id);
