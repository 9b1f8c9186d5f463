-- Lifecycle hooks tell nobody outside, so their messages no longer count for a task's
-- notification_sent: the rule is now the messages' own 'final' flag (errands.notify.policy).
UPDATE messages SET final = 0 WHERE channel = 'hook';
