-- Newest-first listings scan these indexes backwards. Stored descending, every new task went
-- to the left edge of the b-tree, where pages split in half instead of filling up: two
-- indexes kept half-empty and about one more page written per commit.
DROP INDEX tasks_owner_created;
CREATE INDEX tasks_owner_created ON tasks (owner, created_at, id);
DROP INDEX tasks_created;
CREATE INDEX tasks_created ON tasks (created_at, id);
