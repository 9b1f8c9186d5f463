-- Output streams: where each stream of the current attempt stands (next position, bytes so far),
-- so that a provider's chunks land once and in order (errands.model.stream_output).
ALTER TABLE tasks ADD COLUMN stream_positions TEXT;
