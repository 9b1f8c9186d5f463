"""Every statement the shared operations run, by name: each dialect writes its own SQL for each.

The operations (:mod:`errands.store.shared`) name a statement and pass its parameters in the
order given here; a dialect's statements (``errands.store.sqlite.sql``,
``errands.store.postgres.sql``) fill every field, so a statement missing in one dialect is a
start-up error, not a surprise in production. Lists are passed as lists: PostgreSQL takes them
as arrays, SQLite as JSON (``json_each``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from errands.model import TERMINAL
from errands.model.usage import STATUSES

#: The ordering rule of messages, once for both dialects: a message waits while an earlier one
#: of the same task to the same destination is pending, so each destination sees a task's
#: events in order. ``{messages}`` is the table; the message is ``m``.
#: The statuses that end a task, as an SQL list (an event that leaves a task in one ends it).
ENDED = "(" + ", ".join(sorted(f"'{s.value}'" for s in TERMINAL)) + ")"
FIRST_IN_LINE = (
    "NOT EXISTS (SELECT 1 FROM {messages} p WHERE p.state = 'pending' AND p.task_id = m.task_id "
    "AND p.channel = m.channel AND p.target = m.target AND p.seq < m.seq)"
)

#: A claim's rule for ``start_within_s`` (:func:`errands.model.too_late_to_start`, in SQL): a
#: task never started and past its ``start_by`` is not read, so it cannot fill the claim's
#: window while it waits for the sweeper to end it. ``{now}`` is the claim's time.
STARTABLE = " AND (start_by IS NULL OR started_at IS NOT NULL OR start_by >= {now})"

#: A ledger entry's columns, in :class:`errands.model.credits.LedgerEntry`'s order.
LEDGER_COLUMNS = "id, owner, kind, amount, held, balance, reserved, at, task_id, note"


def usage_sql(*, day: str, tasks: str, days: str, param: Callable[[int], str]) -> str:
    """The ``usage`` statement of a dialect: ``day`` is its SQL for a task's day (UTC) of
    submit, ``tasks`` and ``days`` its tables. The live counts of the stored tasks and the
    rollups of purged ones, read in one statement (one snapshot: a purge moving tasks from one
    to the other is seen whole or not at all), summed per (day, owner, type), in that order."""
    counts = ", ".join(
        f"CAST(sum(CASE WHEN status = '{s.value}' THEN n ELSE 0 END) AS BIGINT)" for s in STATUSES
    )
    p = param
    return (
        f"SELECT day, owner, type, {counts}, "
        "CAST(sum(CASE WHEN status = 'completed' THEN c ELSE 0 END) AS BIGINT), "
        "CAST(sum(CASE WHEN status IN ('pending', 'processing') THEN c ELSE 0 END) AS BIGINT) "
        f"FROM (SELECT {day} AS day, owner, type, status, count(*) AS n, sum(cost) AS c FROM {tasks} "
        f"WHERE created_at >= {p(1)} AND created_at < {p(2)}{{tasks_where}} GROUP BY 1, 2, 3, 4 "
        f"UNION ALL SELECT day, owner, type, status, tasks, credits FROM {days} "
        f"WHERE day >= {p(3)} AND day <= {p(4)}{{days_where}}) AS u "
        f"GROUP BY day, owner, type HAVING (day, owner, type) > ({p(5)}, {p(6)}, {p(7)}) "
        f"ORDER BY day, owner, type LIMIT {p(8)}"
    )


@dataclass(frozen=True, slots=True)
class Statements:
    """One dialect's SQL (parameters in the order named)."""

    #: The placeholder of the n-th parameter (1-based), for the statements built per query.
    param: Callable[[int], str]

    # -- tasks --------------------------------------------------------------------------------
    select_task: str  # id → task row
    select_tombstone: str  # id → (id, owner, purged_at)
    list_tasks: str  # a template with {where} and {limit}; newest first
    #: The condition "the id starts with" (its two placeholders: the prefix and the prefix with
    #: "~" after it, which sorts after every id character where ids compare by their bytes).
    id_prefix: str
    count_tasks: str  # a template with {where} → (count,)
    count_by_status: str  # a template with {where} → (status, count)
    series_created: str  # since, step → (bucket, count): tasks created per step since
    series_finished: str  # since, step → (bucket, status, count): tasks ended per step since
    type_waits: str  # since, sample → (type, queue wait) of the latest starts
    type_runs: str  # since, sample → (type, run time) of the latest ends (not cancelled)
    count_pending: str  # owner, cap → (count up to cap,)
    debounced: str  # owner, type, debounce_key, ids → ids of the key's other pending tasks
    claim: str  # types, now, window → task rows, queue order (locked where the dialect locks)
    renew: str  # until, ids, tokens → ids whose lease was extended
    claim_except: str  # the same, then types, pers, owners, keys of scopes held back → task rows
    # types, scopes → (type, owner, key, count) of the tasks running now, and (…, scope, tat)
    # of each scope's rate state, in one read
    flow_usage: str
    set_flow_rates: str  # scopes, tats: each scope's rate state, inserted or replaced
    next_ready: str  # types, after → (earliest run_after of a task in backoff,)
    set_poll_at: str  # when, id
    # -- the sweeper's ------------------------------------------------------------------------
    due_leases: str  # now, limit → ids
    due_deadlines: str  # now, limit → ids
    due_expiry: str  # now, limit → ids
    due_starts: str  # now, limit → ids of tasks never started by start_by
    due_polls: str  # now, limit → ids
    next_poll: str  # → (the earliest poll_at of a running task, or NULL,)
    purge_tasks: str  # finished_before, limit → (id, owner, type, created_at, status, cost) of those deleted
    purge_events: str  # ids → seqs of the events it deleted
    raise_horizon: str  # seq
    add_tombstones: str  # ids, owners, now
    purge_tombstones: str  # before
    purge_old: tuple[str, ...]  # each: before (receipts, delivery ids, messages, attempts, rates)
    stats_counts: str  # → (status, type, count)
    pending_by_type: str  # → (type, count) of the pending tasks
    stats_waits: str  # since, sample → (queue wait,)
    stats_runs: str  # since, sample → (run time,)
    # -- the event log ------------------------------------------------------------------------
    task_events: str  # task_id, after, limit → event rows
    task_events_plain: str  # the same without task.stream events
    task_events_output: str  # the same, only task.stream events and those that end the task
    log_since: str  # after, limit → event rows with the "behind" flag as a ninth column
    log_since_headers: str  # the same without snapshots
    last_seq: str  # → (seq,)
    all_events_between: str  # after, until, limit → event rows
    owner_events_between: str  # owner, after, until, limit → event rows
    horizon: str  # → (seq,)
    # -- provider reports ---------------------------------------------------------------------
    receipts: str  # limit → receipt rows, newest first
    task_receipts: str  # task_id, limit → receipt rows, newest first
    # -- notifications ------------------------------------------------------------------------
    insert_endpoint: str  # the endpoint's columns
    select_endpoint: str  # id → endpoint row
    lock_endpoint: str  # id → endpoint row, locked
    list_endpoints: str  # → endpoint rows
    update_endpoint: str  # the endpoint's columns (id first)
    delete_endpoint: str  # id
    fail_pending: str  # why, now, endpoint_id
    set_health: str  # failing_since, throttled_until, enabled, disabled_reason, updated_at, id
    notify_cursor: str  # → (cursor,)
    notify_urls_after: str  # seq → a row if a task with a notify_url may have ended after it
    init_notify_cursor: str
    move_notify_cursor: str  # upto, after (as text)
    insert_message: str  # the message's columns (skipped if the event already has it)
    due_messages: str  # now, channels, hooks, limit → message and endpoint columns
    claim_message: str  # attempts, next_at, lease_token, now, id
    message_ref: str  # id → (task_id, seq, final)
    insert_attempt: str  # the attempt's columns
    finish_message: str  # state, next_at, status, error, now, id, lease_token
    final_left: str  # task_id, seq → a row if a message counting for that end is undelivered
    next_message_at: str  # channels, hooks → (earliest next_at,)
    select_message: str  # id → message row
    list_messages: str  # a template with {where} and {limit}; newest first
    list_attempts: str  # a template with {where} and {limit} → attempt rows and id, newest first
    resend_message: str  # now, id → message row
    recover_endpoint: str  # now, endpoint_id, since
    # -- credits ------------------------------------------------------------------------------
    lock_balance: str  # owner → (owner, balance, reserved, updated_at), locked (never waited for)
    set_balance: str  # owner, balance, reserved, now
    insert_ledger: str  # owner, kind, amount, held, balance, reserved, at, task_id, note → (id,)
    select_balance: str  # owner → (owner, balance, reserved, updated_at)
    list_balances: str  # after (owner), limit → balance rows by owner
    select_ledger: str  # owner, after (id), limit → ledger rows (LEDGER_COLUMNS) by id
    select_all_ledger: str  # after (id), limit → every owner's ledger rows by id
    #: (usage_sql) since, until (timestamps), first and last day, after (day, owner, type), limit,
    #: then the template's own: {tasks_where} and {days_where}, each " AND …" or empty → usage rows
    usage: str
    add_usage: str  # day, owner, type, status, tasks, credits: added to the day's rollup
    # -- meta ---------------------------------------------------------------------------------
    meta_setdefault: str  # key, value → (stored value,)
    hold: str  # 'hold:' + name, until (text) → (stored until,): the later of the two is kept
    holds: str  # → (key, until) of every hold
    add_admin_key: str  # hash, now
    admin_keys: str  # → (hash,)
