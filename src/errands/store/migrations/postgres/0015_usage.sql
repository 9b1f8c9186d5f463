-- Usage (errands.model.usage): what purged tasks came to, per day (UTC, of their submit),
-- owner, type and status; the tasks still stored are counted from themselves.
CREATE TABLE errands_usage_days (
    day     text NOT NULL,
    owner   text NOT NULL,
    type    text NOT NULL,
    status  text NOT NULL,
    tasks   bigint NOT NULL,
    credits bigint NOT NULL,
    PRIMARY KEY (day, owner, type, status)
);
CREATE INDEX errands_usage_days_owner ON errands_usage_days (owner, day);
