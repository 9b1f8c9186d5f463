-- Debounce: a newer task of the same owner and type with the same debounce_key replaces a
-- pending older one; the index finds the pending ones of a key.
ALTER TABLE tasks ADD COLUMN debounce_key TEXT;
CREATE INDEX tasks_debounce ON tasks (owner, type, debounce_key) WHERE status = 'pending' AND debounce_key IS NOT NULL;
