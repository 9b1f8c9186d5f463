-- Resuming a watch of an owner's tasks reads that owner's events after a seq.
CREATE INDEX errands_events_owner ON errands_events (owner, seq);
-- The highest seq whose event was purged: a watch resuming from before it may have missed events.
INSERT INTO errands_meta (key, value) VALUES ('horizon', '0');
