"""The SQLite store's statements (see :mod:`errands.store.statements` for what each is given)."""

from __future__ import annotations

from errands.store.columns import (
    ATTEMPTS,
    ENDPOINTS,
    EVENT_COLUMNS,
    EVENT_HEADERS,
    MESSAGES,
    RECEIPTS,
    SELECT_LIST,
)
from errands.store.statements import ENDED, FIRST_IN_LINE, LEDGER_COLUMNS, STARTABLE, Statements, usage_sql


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _each(n: int) -> str:
    """A list parameter (given as JSON) as the rows of a subquery."""
    return f"(SELECT value FROM json_each(?{n}))"


#: The seq of the latest event ever written. Events are only deleted by a purge, which first
#: raises the horizon to the highest seq it deletes, so the newest event left or the horizon
#: holds it; no counter is written per commit (it would cost one more page per commit). The
#: 'seq' counter that errands 0.1.0 wrote per commit stays a floor, for databases it wrote.
LAST_SEQ = (
    "SELECT max(coalesce((SELECT max(seq) FROM events), 0), "
    "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'horizon'), "
    "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'seq'))"
)


def _channels(channels: int, hooks: int) -> str:
    """Messages of the listed channels, or of the listed hooks (parameters ``channels``, ``hooks``)."""
    return f"(m.channel IN {_each(channels)} OR (m.channel = 'hook' AND m.target IN {_each(hooks)}))"


_M = ", ".join(f"m.{c}" for c in MESSAGES.names)
_E = ", ".join(f"e.{c}" for c in ENDPOINTS.names)


def _claim(extra: str) -> str:
    """The queue (claimable since created) and the tasks that came due (delayed, retried or
    released), each read in order from its own index, merged in queue order: priority, then
    queued_at (the creation of the first, when the others came due)."""
    extra = STARTABLE.format(now="?2") + extra
    return (
        f"SELECT * FROM (SELECT {SELECT_LIST} FROM tasks WHERE status = 'pending' AND run_after <= created_at "
        f"AND run_after <= ?2 AND type IN {_each(1)}{extra} ORDER BY priority DESC, created_at, id LIMIT ?3) "
        f"UNION ALL SELECT * FROM (SELECT {SELECT_LIST} FROM tasks WHERE status = 'pending' "
        f"AND run_after > created_at AND run_after <= ?2 AND type IN {_each(1)}{extra} "
        "ORDER BY priority DESC, run_after, id LIMIT ?3) ORDER BY priority DESC, queued_at, id LIMIT ?3"
    )


STATEMENTS = Statements(
    param=lambda n: f"?{n}",
    # -- tasks
    select_task=f"SELECT {SELECT_LIST} FROM tasks WHERE id = ?",
    select_tombstone="SELECT id, owner, purged_at FROM tombstones WHERE id = ?",
    list_tasks=f"SELECT {SELECT_LIST} FROM tasks {{where}} ORDER BY created_at DESC, id DESC LIMIT {{limit}}",
    id_prefix="id >= {} AND id < {}",  # SQLite compares text by its bytes: a range of the primary key
    count_tasks="SELECT count(*) FROM tasks {where}",
    count_by_status="SELECT status, count(*) FROM tasks {where} GROUP BY status",
    series_created=(
        "SELECT CAST(created_at / ?2 AS INTEGER), count(*) FROM tasks WHERE created_at >= ?1 GROUP BY 1"
    ),
    series_finished=(
        "SELECT CAST(finished_at / ?2 AS INTEGER), status, count(*) FROM tasks WHERE finished_at >= ?1 "
        "GROUP BY 1, 2"
    ),
    type_waits=(
        "SELECT type, started_at - queued_at FROM tasks WHERE started_at >= ?1 "
        "ORDER BY started_at DESC LIMIT ?2"
    ),
    type_runs=(
        "SELECT type, finished_at - started_at FROM tasks WHERE finished_at IS NOT NULL AND finished_at >= ?1 "
        "AND started_at IS NOT NULL AND status != 'cancelled' ORDER BY finished_at DESC LIMIT ?2"
    ),
    count_pending="SELECT count(*) FROM (SELECT 1 FROM tasks WHERE owner = ? AND status = 'pending' LIMIT ?)",
    debounced=(
        "SELECT id FROM tasks WHERE owner = ?1 AND type = ?2 AND debounce_key = ?3 "
        f"AND status = 'pending' AND id NOT IN {_each(4)} ORDER BY id"
    ),
    claim=_claim(""),
    # A claim's second look, past the tasks of the scopes that held the first one back.
    claim_except=_claim(
        " AND NOT EXISTS (SELECT 1 FROM json_each(?4) t JOIN json_each(?5) p ON p.key = t.key "
        "JOIN json_each(?6) o ON o.key = t.key JOIN json_each(?7) k ON k.key = t.key "
        "WHERE t.value = tasks.type AND (p.value = 'all' OR (o.value = tasks.owner "
        "AND (p.value = 'owner' OR k.value = coalesce(tasks.limit_key, tasks.owner)))))"
    ),
    flow_usage=(
        "SELECT type, owner, limit_key, count(*), NULL, NULL FROM tasks WHERE status = 'processing' "
        f"AND type IN {_each(1)} GROUP BY type, owner, limit_key "
        f"UNION ALL SELECT NULL, NULL, NULL, 0, scope, tat FROM flow_rates WHERE scope IN {_each(2)}"
    ),
    set_flow_rates=(
        "INSERT INTO flow_rates (scope, tat) SELECT s.value, t.value FROM json_each(?1) s "
        "JOIN json_each(?2) t ON t.key = s.key WHERE true ON CONFLICT (scope) DO UPDATE SET tat = excluded.tat"
    ),
    renew=(
        "UPDATE tasks SET lease_expires_at = ?1 FROM (SELECT i.value AS id, t.value AS token "
        "FROM json_each(?2) i JOIN json_each(?3) t ON t.key = i.key) AS l "
        "WHERE tasks.id = l.id AND tasks.status = 'processing' AND tasks.lease_token = l.token RETURNING tasks.id"
    ),
    next_ready=(
        "SELECT min(run_after) FROM tasks WHERE status = 'pending' AND run_after > created_at "
        f"AND run_after > ?2 AND type IN {_each(1)}"
    ),
    set_poll_at="UPDATE tasks SET poll_at = ? WHERE id = ? AND status = 'processing' AND poll_at IS NOT NULL",
    # -- the sweeper's
    due_leases=(
        "SELECT id FROM tasks WHERE status = 'processing' AND lease_token IS NOT NULL AND lease_expires_at < ? LIMIT ?"
    ),
    due_deadlines="SELECT id FROM tasks WHERE status = 'processing' AND deadline_at < ? LIMIT ?",
    due_expiry="SELECT id FROM tasks WHERE status IN ('pending', 'processing') AND expires_at < ? LIMIT ?",
    due_starts=(
        "SELECT id FROM tasks WHERE status = 'pending' AND started_at IS NULL AND start_by IS NOT NULL "
        "AND start_by < ? LIMIT ?"
    ),
    due_polls="SELECT id FROM tasks WHERE status = 'processing' AND poll_at IS NOT NULL AND poll_at <= ? LIMIT ?",
    next_poll="SELECT min(poll_at) FROM tasks WHERE status = 'processing' AND poll_at IS NOT NULL",
    purge_tasks=(
        "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ? "
        "LIMIT ?) RETURNING id, owner, type, created_at, status, cost"
    ),
    purge_events=f"DELETE FROM events WHERE task_id IN {_each(1)} RETURNING seq",
    raise_horizon="UPDATE meta SET value = ?1 WHERE key = 'horizon' AND CAST(value AS INTEGER) < ?1",
    add_tombstones=(
        "INSERT OR REPLACE INTO tombstones (id, owner, purged_at) SELECT i.value, o.value, ?3 "
        "FROM json_each(?1) i JOIN json_each(?2) o ON o.key = i.key"
    ),
    purge_tombstones="DELETE FROM tombstones WHERE purged_at < ?",
    purge_old=(
        "DELETE FROM webhook_ids WHERE received_at < ?",
        "DELETE FROM webhook_deliveries WHERE received_at < ?",
        "DELETE FROM messages WHERE state != 'pending' AND updated_at < ?",
        "DELETE FROM message_attempts WHERE attempted_at < ?",
        "DELETE FROM flow_rates WHERE tat < ?",  # long past: the same as no state
    ),
    stats_counts="SELECT status, type, count(*) FROM tasks GROUP BY status, type",
    pending_by_type="SELECT type, count(*) FROM tasks WHERE status = 'pending' GROUP BY type",
    stats_waits=(
        "SELECT started_at - queued_at FROM tasks WHERE started_at >= ? ORDER BY started_at DESC LIMIT ?"
    ),
    stats_runs=(
        "SELECT finished_at - started_at FROM tasks WHERE finished_at IS NOT NULL AND finished_at >= ? "
        "AND started_at IS NOT NULL AND status != 'cancelled' ORDER BY finished_at DESC LIMIT ?"
    ),
    # -- the event log
    task_events=f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    task_events_plain=(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND seq > ? AND type != 'task.stream' "
        "ORDER BY seq LIMIT ?"
    ),
    task_events_output=(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND seq > ? "
        f"AND (type = 'task.stream' OR status IN {ENDED}) ORDER BY seq LIMIT ?"
    ),
    log_since=f"SELECT {EVENT_COLUMNS}, 0 FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
    log_since_headers=f"SELECT {EVENT_HEADERS}, 0 FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
    last_seq=LAST_SEQ,
    all_events_between=f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
    owner_events_between=(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE owner = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
    ),
    horizon="SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'horizon'",
    # -- provider reports
    receipts=f"SELECT {RECEIPTS.select} FROM webhook_deliveries ORDER BY id DESC LIMIT ?",
    task_receipts=f"SELECT {RECEIPTS.select} FROM webhook_deliveries WHERE task_id = ? ORDER BY id DESC LIMIT ?",
    # -- notifications
    insert_endpoint=f"INSERT INTO endpoints ({ENDPOINTS.select}) VALUES ({_marks(len(ENDPOINTS.names))})",
    select_endpoint=f"SELECT {ENDPOINTS.select} FROM endpoints WHERE id = ?",
    lock_endpoint=f"SELECT {ENDPOINTS.select} FROM endpoints WHERE id = ?",  # the one writer holds the lock
    list_endpoints=f"SELECT {ENDPOINTS.select} FROM endpoints ORDER BY id",
    update_endpoint=(
        "UPDATE endpoints SET "
        + ", ".join(f"{c} = ?{i}" for i, c in enumerate(ENDPOINTS.names[1:], start=2))
        + " WHERE id = ?1"
    ),
    delete_endpoint="DELETE FROM endpoints WHERE id = ?",
    fail_pending=(
        "UPDATE messages SET state = 'failed', last_error = ?, lease_token = NULL, updated_at = ? "
        "WHERE channel = 'endpoint' AND target = ? AND state = 'pending'"
    ),
    set_health=(
        "UPDATE endpoints SET failing_since = ?, throttled_until = ?, enabled = ?, disabled_reason = ?, "
        "updated_at = ? WHERE id = ?"
    ),
    notify_cursor="SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'notify_cursor'",
    notify_urls_after="SELECT 1 FROM tasks WHERE notify_url IS NOT NULL AND seq > ? LIMIT 1",
    init_notify_cursor="INSERT OR IGNORE INTO meta (key, value) VALUES ('notify_cursor', '0')",
    move_notify_cursor="UPDATE meta SET value = ? WHERE key = 'notify_cursor' AND value = ?",
    insert_message=f"INSERT OR IGNORE INTO messages ({MESSAGES.select}) VALUES ({_marks(len(MESSAGES.names))})",
    due_messages=(
        f"SELECT {_M}, {_E} FROM messages m LEFT JOIN endpoints e ON m.channel = 'endpoint' AND e.id = m.target "
        f"WHERE m.state = 'pending' AND m.next_at <= ?1 AND {_channels(2, 3)} "
        "AND (m.channel != 'endpoint' OR (e.enabled = 1 AND coalesce(e.throttled_until, 0) <= ?1)) "
        f"AND {FIRST_IN_LINE.format(messages='messages')} ORDER BY m.next_at LIMIT ?4"
    ),
    claim_message="UPDATE messages SET attempts = ?, next_at = ?, lease_token = ?, updated_at = ? WHERE id = ?",
    message_ref="SELECT task_id, seq, final FROM messages WHERE id = ?",
    insert_attempt=f"INSERT INTO message_attempts ({ATTEMPTS.select}) VALUES ({_marks(len(ATTEMPTS.names))})",
    finish_message=(
        "UPDATE messages SET state = ?, next_at = ?, last_status = ?, last_error = ?, updated_at = ?, "
        "lease_token = NULL WHERE id = ? AND lease_token = ?"
    ),
    final_left=(
        "SELECT 1 FROM messages WHERE task_id = ? AND seq = ? AND final = 1 AND state != 'delivered' LIMIT 1"
    ),
    next_message_at=f"SELECT min(m.next_at) FROM messages m WHERE m.state = 'pending' AND {_channels(1, 2)}",
    select_message=f"SELECT {MESSAGES.select} FROM messages WHERE id = ?",
    list_messages=f"SELECT {MESSAGES.select} FROM messages {{where}} ORDER BY created_at DESC, id DESC LIMIT {{limit}}",
    list_attempts=f"SELECT {ATTEMPTS.select}, id FROM message_attempts {{where}} ORDER BY id DESC LIMIT {{limit}}",
    resend_message=(
        "UPDATE messages SET state = 'pending', attempts = 0, next_at = ?1, lease_token = NULL, updated_at = ?1 "
        f"WHERE id = ?2 RETURNING {MESSAGES.select}"
    ),
    recover_endpoint=(
        "UPDATE messages SET state = 'pending', attempts = 0, next_at = ?1, lease_token = NULL, updated_at = ?1 "
        "WHERE channel = 'endpoint' AND target = ?2 AND state = 'failed' AND created_at >= ?3"
    ),
    # -- credits (the writer holds the database's one write lock: a read is as good as locked)
    lock_balance="SELECT owner, balance, reserved, updated_at FROM credit_balances WHERE owner = ?",
    set_balance=(
        "INSERT INTO credit_balances (owner, balance, reserved, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (owner) DO UPDATE SET balance = excluded.balance, reserved = excluded.reserved, "
        "updated_at = excluded.updated_at"
    ),
    insert_ledger=(
        "INSERT INTO credit_ledger (owner, kind, amount, held, balance, reserved, at, task_id, note) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
    ),
    select_balance="SELECT owner, balance, reserved, updated_at FROM credit_balances WHERE owner = ?",
    list_balances=(
        "SELECT owner, balance, reserved, updated_at FROM credit_balances WHERE owner > ? ORDER BY owner LIMIT ?"
    ),
    select_ledger=f"SELECT {LEDGER_COLUMNS} FROM credit_ledger WHERE owner = ? AND id > ? ORDER BY id LIMIT ?",
    select_all_ledger=f"SELECT {LEDGER_COLUMNS} FROM credit_ledger WHERE id > ? ORDER BY id LIMIT ?",
    usage=usage_sql(
        day="date(CAST(created_at AS INTEGER), 'unixepoch')",
        tasks="tasks",
        days="usage_days",
        param=lambda n: f"?{n}",
    ),
    add_usage=(
        "INSERT INTO usage_days (day, owner, type, status, tasks, credits) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (day, owner, type, status) DO UPDATE SET tasks = tasks + excluded.tasks, "
        "credits = credits + excluded.credits"
    ),
    # -- meta
    meta_setdefault=(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = meta.value "
        "RETURNING value"
    ),
    hold=(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = "
        "CASE WHEN CAST(meta.value AS REAL) < CAST(excluded.value AS REAL) THEN excluded.value "
        "ELSE meta.value END RETURNING CAST(value AS REAL)"
    ),
    holds="SELECT key, CAST(value AS REAL) FROM meta WHERE key >= 'hold:' AND key < 'hold;'",
    add_admin_key="INSERT OR IGNORE INTO admin_keys (hash, created_at) VALUES (?, ?)",
    admin_keys="SELECT hash FROM admin_keys",
)
