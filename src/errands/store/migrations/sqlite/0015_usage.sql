-- Usage (errands.model.usage): what purged tasks came to, per day (UTC, of their submit),
-- owner, type and status; the tasks still stored are counted from themselves.
CREATE TABLE usage_days (
    day     TEXT NOT NULL,
    owner   TEXT NOT NULL,
    type    TEXT NOT NULL,
    status  TEXT NOT NULL,
    tasks   INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    PRIMARY KEY (day, owner, type, status)
);

CREATE INDEX usage_days_owner ON usage_days (owner, day);
