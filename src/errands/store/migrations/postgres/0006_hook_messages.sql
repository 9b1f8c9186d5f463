-- Lifecycle hooks tell nobody outside, so their messages no longer count for a task's
-- notification_sent: the rule is now the messages' own 'final' flag (errands.notify.policy).
UPDATE errands_messages SET final = false WHERE channel = 'hook';
