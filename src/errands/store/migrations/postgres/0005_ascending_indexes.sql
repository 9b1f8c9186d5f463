-- Newest-first listings scan these indexes backwards. Stored descending, every new task went
-- to the left edge of the b-tree, where pages split in half instead of filling up.
DROP INDEX errands_tasks_owner_created;
CREATE INDEX errands_tasks_owner_created ON errands_tasks (owner, created_at, id);
DROP INDEX errands_tasks_created;
CREATE INDEX errands_tasks_created ON errands_tasks (created_at, id);
