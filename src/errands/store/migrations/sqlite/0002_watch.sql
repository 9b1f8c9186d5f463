-- Resuming a watch of an owner's tasks reads that owner's events after a seq.
CREATE INDEX events_owner ON events (owner, seq);
-- The highest seq whose event was purged: a watch resuming from before it may have missed events.
INSERT INTO meta (key, value) VALUES ('horizon', '0');
