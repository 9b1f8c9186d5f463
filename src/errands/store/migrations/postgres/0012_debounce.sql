-- Debounce: a newer task of the same owner and type with the same debounce_key replaces a
-- pending older one; the index finds the pending ones of a key.
ALTER TABLE errands_tasks ADD COLUMN debounce_key text;
CREATE INDEX errands_tasks_debounce ON errands_tasks (owner, type, debounce_key) WHERE status = 'pending' AND debounce_key IS NOT NULL;
