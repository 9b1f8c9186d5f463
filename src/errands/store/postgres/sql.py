"""The PostgreSQL store's statements (see :mod:`errands.store.statements` for what each is
given), and the statements only its write path runs (see :mod:`.writer`)."""

from __future__ import annotations

from errands.model import NOTIFY_URL_MARK, TERMINAL_EVENT
from errands.store.columns import (
    ATTEMPTS,
    COLUMNS,
    ENDPOINTS,
    EVENT_COLUMNS,
    MESSAGES,
    MUTABLE,
    PG_TYPES,
    RECEIPTS,
    SELECT_LIST,
)
from errands.store.postgres.notices import CHANNEL, HINT_MARK
from errands.store.statements import ENDED, FIRST_IN_LINE, LEDGER_COLUMNS, STARTABLE, Statements, usage_sql

#: The seq base of the transaction (assigning its id if it has none yet), read beside a row.
BASE = "(pg_current_xact_id()::text::bigint << 16)"
#: What precedes the transaction's events in the log, read by each statement that writes events:
#: the last seq below its base when no older transaction of errands' runs (no other can still
#: commit below it), else NULL (``errands_after``, migration 0016).
AFTER = f"errands_after({BASE})"


def _notify(payload: str, channels_arg: str, *, full: str | None = None) -> str:
    """An expression that notifies ``payload`` on each channel of a ``text[]`` argument (``full``
    instead on :data:`CHANNEL`, which hubs that follow the whole log listen to)."""
    if full is not None:
        payload = f"CASE WHEN c = '{CHANNEL}' THEN {full} ELSE {payload} END"
    return f"(SELECT count(pg_notify(c, {payload})) FROM unnest({channels_arg}::text[]) AS c)"


def _carrying(payload: str, after: str, events: str, condition: str = "") -> str:
    """``payload`` followed by what precedes the events and the events (``…/after/events``, see
    :func:`.notices.events_text`), when ``after`` is known, the events were given (the statement's
    argument ``events`` is not empty) and ``condition`` holds: the payload on :data:`CHANNEL`."""
    return (
        f"{payload} || CASE WHEN {after} IS NOT NULL AND {events}::text <> ''{condition} "
        f"THEN '{HINT_MARK}' || {after}::text || '{HINT_MARK}' || {events}::text ELSE '' END"
    )


def _marks(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


WRITTEN = tuple(c for c in MUTABLE if c != "seq")
INSERTED = tuple(c for c in COLUMNS if c != "seq")


def _commit_sql(*, seen: bool = False, single: bool = False) -> str:
    """The second phase of a write transaction: rows, events, notification; one round trip.

    With ``seen``, the changes were decided on rows as their writers last saw them, not read
    here: the statement is a transaction of its own, and writes a change (and its event) only
    where the row is still as seen (its seq, and the two columns written without one: the
    lease's expiry and the next poll), locking those rows first (``SKIP LOCKED``: a row another
    transaction holds is left as it is, its change decided again on the row as it is; never
    waiting, the statement needs no order of locks). A row its seq says was written by an older
    transaction is the only kind there can be (what the statement's snapshot sees committed
    before the transaction took its id), checked all the same. It returns the ids written."""
    n_rows = len(WRITTEN) + 2  # id, ord, then the columns

    def arr(i: int, t: str) -> str:
        return f"ARRAY[${i}::{t}]" if single else f"${i}::{t}[]"

    row_args = ", ".join(
        arr(i + 2, t) for i, t in enumerate(["text", "int4"] + [PG_TYPES[c] for c in WRITTEN])
    )
    row_names = ", ".join(["id", "ord", *WRITTEN])
    first_event = n_rows + 2
    event_types = ["int4", "text", "float8", "text", "text", "text", "text", "bytea"]
    event_args = ", ".join(arr(first_event + i, t) for i, t in enumerate(event_types))
    sets = ", ".join(f"{c} = r.{c}" for c in WRITTEN)
    hint, chans = first_event + len(event_types), first_event + len(event_types) + 1
    events = chans + 1  # the events as a notification carries them (see events_text), or ''
    payload = f"(base + $1::int4)::text || '{HINT_MARK}' || ${hint}::text"
    # On CHANNEL, the events themselves, when nothing can come between them and what precedes
    # them (and, decided on rows as seen, when every row was written).
    every = "" if not seen else f" AND (SELECT count(*) FROM written) = cardinality({arr(2, 'text')})"
    full = _carrying(payload, "after", f"${events}", every)
    if not seen:
        return f"""
WITH s AS (
    SELECT {BASE} AS base, {AFTER} AS after
), written AS (
    UPDATE errands_tasks t SET {sets}, seq = s.base + r.ord
    FROM s, unnest({row_args}) AS r({row_names})
    WHERE t.id = r.id
), events AS (
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT s.base + e.ord, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, e.task
    FROM s, unnest({event_args}) AS e(ord, type, at, task_id, owner, task_type, status, task)
)
SELECT base, {_notify(payload, f"${chans}", full=full)}, after FROM s
"""
    x = events + 1  # the rows as seen: ids, seqs, lease expiries, next polls
    return f"""
WITH s AS (
    SELECT {BASE} AS base, {AFTER} AS after
), still AS MATERIALIZED (
    SELECT t.id FROM errands_tasks t
    JOIN unnest({arr(x, "text")}, {arr(x + 1, "int8")}, {arr(x + 2, "float8")}, {arr(x + 3, "float8")}) AS x(id, seq, lease, poll)
      ON t.id = x.id
    WHERE t.seq = x.seq AND t.seq < (SELECT base FROM s)
      AND t.lease_expires_at IS NOT DISTINCT FROM x.lease AND t.poll_at IS NOT DISTINCT FROM x.poll
    FOR UPDATE OF t SKIP LOCKED
), written AS (
    UPDATE errands_tasks t SET {sets}, seq = s.base + r.ord
    FROM s, unnest({row_args}) AS r({row_names})
    WHERE t.id = r.id AND t.id IN (SELECT id FROM still)
    RETURNING t.id
), events AS (
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT s.base + e.ord, e.type, e.at, e.task_id, e.owner, e.task_type, e.status, e.task
    FROM s, unnest({event_args}) AS e(ord, type, at, task_id, owner, task_type, status, task)
    WHERE e.task_id IN (SELECT id FROM written)
)
SELECT base, ARRAY(SELECT id FROM written),
       CASE WHEN EXISTS (SELECT 1 FROM written) THEN {_notify(payload, f"${chans}", full=full)} END, after
FROM s
"""


def _insert_sql() -> str:
    """A create in one statement: the row with its final seq, its event, the notification (its
    hints and work, ``hint/work``: work now, or later for a delayed task; then on
    :data:`CHANNEL` the event as the last argument gives it, or ``''``)."""
    n = len(INSERTED)
    row = [f"${i + 1}::{PG_TYPES[c]}" for i, c in enumerate(INSERTED)]
    payload = f"seq::text || '{HINT_MARK}' || ${n + 3}::text"
    full = _carrying(payload, "after", f"${n + 5}")
    # (``after`` is read in a subquery of the created row: nothing of it when nothing was.)
    return f"""
WITH ins AS (
    INSERT INTO errands_tasks ({", ".join(INSERTED)}, seq)
    SELECT {", ".join(row)}, {BASE} + ${n + 1}
    WHERE NOT EXISTS (SELECT 1 FROM errands_tombstones WHERE id = $1)
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id, owner, type, updated_at
), ev AS (
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT seq, 'task.created', updated_at, id, owner, type, 'pending', ${n + 2} FROM ins
)
SELECT seq, {_notify(payload, f"${n + 4}", full=full)}, after
FROM (SELECT seq, {AFTER} AS after FROM ins) created
"""


def _insert_many_sql() -> str:
    """Several creates in one statement (as :func:`_insert_sql`, a row per array element): the
    ids it returns were created; the others already exist (or were purged)."""
    n = len(INSERTED)
    arrays = ", ".join(f"${i + 1}::{PG_TYPES[c]}[]" for i, c in enumerate(INSERTED))
    names = ", ".join(INSERTED)
    payload = f"(SELECT max(seq) FROM ins)::text || '{HINT_MARK}' || ${n + 3}::text"
    every = " AND (SELECT count(*) FROM ins) = cardinality($1::text[])"
    full = _carrying(payload, "(SELECT after FROM aft)", f"${n + 5}", every)
    return f"""
WITH r AS (
    SELECT * FROM unnest({arrays}, ${n + 1}::int4[], ${n + 2}::bytea[]) AS r({names}, ord, snapshot)
    WHERE NOT EXISTS (SELECT 1 FROM errands_tombstones z WHERE z.id = r.id)
), ins AS (
    INSERT INTO errands_tasks ({names}, seq)
    SELECT {names}, {BASE} + ord FROM r
    ON CONFLICT (id) DO NOTHING
    RETURNING seq, id, owner, type, updated_at
), ev AS (
    -- Each row's snapshot by its ordinal (consecutive, from the first): no join of the two lists,
    -- which a plan for lists of unknown length may make a loop in a loop.
    INSERT INTO errands_events ({EVENT_COLUMNS})
    SELECT ins.seq, 'task.created', ins.updated_at, ins.id, ins.owner, ins.type, 'pending',
           (${n + 2}::bytea[])[(ins.seq - {BASE})::int4 - (${n + 1}::int4[])[1] + 1]
    FROM ins
), aft AS (  -- once
    SELECT {AFTER} AS after
), note AS (  -- once, and only if something was created; the events only if all were
    SELECT CASE WHEN EXISTS (SELECT 1 FROM ins) THEN {_notify(payload, f"${n + 4}", full=full)} END AS sent
)
SELECT id, seq, note.sent, aft.after FROM ins, note, aft
"""


COMMIT = _commit_sql()
COMMIT_SEEN = _commit_sql(seen=True)
#: The same for one change of one row, its values passed as they are (see PgTx.commit_changes).
COMMIT_ONE = _commit_sql(single=True)
COMMIT_SEEN_ONE = _commit_sql(seen=True, single=True)
INSERT_TASK = _insert_sql()
INSERT_TASKS = _insert_many_sql()
LOCK_TASKS = f"SELECT {SELECT_LIST}, {BASE} FROM errands_tasks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE NOWAIT"
#: Find a report's task, lock it (NOWAIT, as every lock of a task here) and remember the report's
#: delivery id, in one round trip; the id is remembered only when the task exists.
REPORT_TARGET = f"""
WITH target AS MATERIALIZED (
    SELECT {SELECT_LIST}, {BASE} FROM errands_tasks WHERE {{where}} ORDER BY created_at DESC LIMIT 1 FOR UPDATE NOWAIT
), seen AS (
    INSERT INTO errands_webhook_ids (provider, delivery_id, received_at)
    SELECT $1, $2, $3 WHERE $2::text IS NOT NULL AND EXISTS (SELECT 1 FROM target)
    ON CONFLICT DO NOTHING RETURNING 1
)
SELECT (SELECT count(*) FROM seen), target.* FROM target
"""
# In a namespace of their own: a key held by a scope's lock would only make a claim look on.
LOCK_KEYS = "SELECT pg_try_advisory_xact_lock(hashtextextended('key ' || k, 0)) FROM unnest($1::text[]) AS k"
LOCK_SCOPES = "SELECT s, pg_try_advisory_xact_lock(hashtextextended(s, 0)) FROM unnest($1::text[]) AS s"
INSERT_RECEIPTS = (
    f"INSERT INTO errands_webhook_deliveries ({RECEIPTS.select}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(RECEIPTS.pg_types, start=1))
    + ")"
)
_M = ", ".join(f"m.{c}" for c in MESSAGES.names)
_E = ", ".join(f"e.{c}" for c in ENDPOINTS.names)
_CHANNELS = "(m.channel = ANY({}::text[]) OR (m.channel = 'hook' AND m.target = ANY({}::text[])))"


#: The end events of tasks with a notify_url, as the WHERE of the index of migration 0019 says
#: them (a query that repeats it may be planned on the index): no index of tasks holds seq.
_NOTIFY_URL_ENDS = (
    "type IN (" + ", ".join(f"'{e.value}'" for e in TERMINAL_EVENT.values()) + ") "
    f"AND position('{NOTIFY_URL_MARK.decode()}'::bytea IN task) > 0"
)


def _claim(extra: str, *, locks: bool = True) -> str:
    """The queue (claimable since created) and the tasks that came due (delayed, retried or
    released), each read in order from its own index, merged in queue order: priority, then
    queued_at (the creation of the first, when the others came due); each row locked, skipping
    those locked, unless not ``locks``."""
    extra = STARTABLE.format(now="$2") + extra
    lock = " FOR UPDATE SKIP LOCKED" if locks else ""
    return (
        f"WITH queued AS (SELECT {SELECT_LIST} FROM errands_tasks WHERE status = 'pending' "
        f"AND run_after <= created_at AND run_after <= $2 AND type = ANY($1::text[]){extra} "
        f"ORDER BY priority DESC, created_at, id LIMIT $3{lock}), "
        f"due AS (SELECT {SELECT_LIST} FROM errands_tasks WHERE status = 'pending' "
        f"AND run_after > created_at AND run_after <= $2 AND type = ANY($1::text[]){extra} "
        f"ORDER BY priority DESC, run_after, id LIMIT $3{lock}) "
        "SELECT * FROM queued UNION ALL SELECT * FROM due ORDER BY priority DESC, queued_at, id LIMIT $3"
    )


#: A claim's read without locks, outside a transaction (a claim alone, see the store's claim).
CLAIM_AS_READ = _claim("", locks=False)


STATEMENTS = Statements(
    param=lambda n: f"${n}",
    # -- tasks
    select_task=f"SELECT {SELECT_LIST} FROM errands_tasks WHERE id = $1",
    select_tombstone="SELECT id, owner, purged_at FROM errands_tombstones WHERE id = $1",
    list_tasks=f"SELECT {SELECT_LIST} FROM errands_tasks {{where}} ORDER BY created_at DESC, id DESC LIMIT {{limit}}",
    # The database's collation may sort '~' before letters (en_US, ICU): compare the bytes.
    id_prefix='id COLLATE "C" >= {} AND id COLLATE "C" < {}',
    count_tasks="SELECT count(*) FROM errands_tasks {where}",
    count_by_status="SELECT status, count(*) FROM errands_tasks {where} GROUP BY status",
    series_created=(
        "SELECT floor(created_at / $2)::bigint, count(*) FROM errands_tasks WHERE created_at >= $1 GROUP BY 1"
    ),
    series_finished=(
        "SELECT floor(finished_at / $2)::bigint, status, count(*) FROM errands_tasks WHERE finished_at >= $1 "
        "GROUP BY 1, 2"
    ),
    type_waits=(
        "SELECT type, started_at - queued_at FROM errands_tasks WHERE started_at >= $1 "
        "ORDER BY started_at DESC LIMIT $2"
    ),
    type_runs=(
        "SELECT type, finished_at - started_at FROM errands_tasks WHERE finished_at IS NOT NULL AND finished_at >= $1 "
        "AND started_at IS NOT NULL AND status != 'cancelled' ORDER BY finished_at DESC LIMIT $2"
    ),
    count_pending=(
        "SELECT count(*) FROM (SELECT 1 FROM errands_tasks WHERE owner = $1 AND status = 'pending' LIMIT $2) p"
    ),
    debounced=(
        "SELECT id FROM errands_tasks WHERE owner = $1 AND type = $2 AND debounce_key = $3 "
        "AND status = 'pending' AND NOT (id = ANY($4::text[])) ORDER BY id"
    ),
    claim=_claim(""),
    # A claim's second look, past the tasks of the scopes that held the first one back.
    claim_except=_claim(
        " AND NOT EXISTS (SELECT 1 FROM unnest($4::text[], $5::text[], $6::text[], $7::text[]) AS x(t, per, o, k) "
        "WHERE x.t = type AND (x.per = 'all' OR (x.o = owner "
        "AND (x.per = 'owner' OR x.k = coalesce(limit_key, owner)))))"
    ),
    flow_usage=(
        "SELECT type, owner, limit_key, count(*), NULL, NULL FROM errands_tasks WHERE status = 'processing' "
        "AND type = ANY($1::text[]) GROUP BY type, owner, limit_key "
        "UNION ALL SELECT NULL, NULL, NULL, 0, scope, tat FROM errands_flow_rates WHERE scope = ANY($2::text[])"
    ),
    set_flow_rates=(
        "INSERT INTO errands_flow_rates (scope, tat) SELECT * FROM unnest($1::text[], $2::float8[]) "
        "ON CONFLICT (scope) DO UPDATE SET tat = excluded.tat"
    ),
    renew=(
        "UPDATE errands_tasks t SET lease_expires_at = $1 FROM unnest($2::text[], $3::text[]) AS l(id, token) "
        "WHERE t.id = l.id AND t.status = 'processing' AND t.lease_token = l.token RETURNING t.id"
    ),
    next_ready=(
        "SELECT min(run_after) FROM errands_tasks WHERE status = 'pending' AND run_after > created_at "
        "AND run_after > $2 AND type = ANY($1::text[])"
    ),
    set_poll_at=(
        "UPDATE errands_tasks SET poll_at = $1 WHERE id = $2 AND status = 'processing' AND poll_at IS NOT NULL"
    ),
    # -- the sweeper's
    due_leases=(
        "SELECT id FROM errands_tasks WHERE status = 'processing' AND lease_token IS NOT NULL "
        "AND lease_expires_at < $1 LIMIT $2"
    ),
    due_deadlines="SELECT id FROM errands_tasks WHERE status = 'processing' AND deadline_at < $1 LIMIT $2",
    due_expiry=(
        "SELECT id FROM errands_tasks WHERE status IN ('pending', 'processing') AND expires_at < $1 LIMIT $2"
    ),
    due_starts=(
        "SELECT id FROM errands_tasks WHERE status = 'pending' AND started_at IS NULL AND start_by IS NOT NULL "
        "AND start_by < $1 LIMIT $2"
    ),
    due_polls=(
        "SELECT id FROM errands_tasks WHERE status = 'processing' AND poll_at IS NOT NULL AND poll_at <= $1 LIMIT $2"
    ),
    next_poll="SELECT min(poll_at) FROM errands_tasks WHERE status = 'processing' AND poll_at IS NOT NULL",
    purge_tasks=(
        "DELETE FROM errands_tasks WHERE id IN (SELECT id FROM errands_tasks WHERE finished_at IS NOT NULL "
        "AND finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, owner, type, created_at, status, cost"
    ),
    purge_events="DELETE FROM errands_events WHERE task_id = ANY($1::text[]) RETURNING seq",
    raise_horizon="UPDATE errands_meta SET value = GREATEST(value::bigint, $1)::text WHERE key = 'horizon'",
    add_tombstones=(
        "INSERT INTO errands_tombstones (id, owner, purged_at) SELECT i, o, $3 "
        "FROM unnest($1::text[], $2::text[]) AS t(i, o) ON CONFLICT (id) DO UPDATE SET purged_at = $3"
    ),
    purge_tombstones="DELETE FROM errands_tombstones WHERE purged_at < $1",
    purge_old=(
        "DELETE FROM errands_webhook_ids WHERE received_at < $1",
        "DELETE FROM errands_webhook_deliveries WHERE received_at < $1",
        "DELETE FROM errands_messages WHERE state != 'pending' AND updated_at < $1",
        "DELETE FROM errands_message_attempts WHERE attempted_at < $1",
        "DELETE FROM errands_flow_rates WHERE tat < $1",  # long past: the same as no state
    ),
    stats_counts="SELECT status, type, count(*) FROM errands_tasks GROUP BY status, type",
    pending_by_type="SELECT type, count(*) FROM errands_tasks WHERE status = 'pending' GROUP BY type",
    stats_waits=(
        "SELECT started_at - queued_at FROM errands_tasks WHERE started_at >= $1 ORDER BY started_at DESC LIMIT $2"
    ),
    stats_runs=(
        "SELECT finished_at - started_at FROM errands_tasks WHERE finished_at IS NOT NULL AND finished_at >= $1 "
        "AND started_at IS NOT NULL AND status != 'cancelled' ORDER BY finished_at DESC LIMIT $2"
    ),
    # -- the event log
    task_events=(
        f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    ),
    task_events_plain=(
        f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE task_id = $1 AND seq > $2 AND type != 'task.stream' "
        "ORDER BY seq LIMIT $3"
    ),
    task_events_output=(
        f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE task_id = $1 AND seq > $2 "
        f"AND (type = 'task.stream' OR status IN {ENDED}) ORDER BY seq LIMIT $3"
    ),
    # errands_log and errands_log_bound: see migration 0007 (the bound below which all is read).
    log_since="SELECT * FROM errands_log($1, $2, true)",
    log_since_headers="SELECT * FROM errands_log($1, $2, false)",
    last_seq="SELECT errands_log_bound() - 1",
    all_events_between=(
        f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
    ),
    owner_events_between=(
        f"SELECT {EVENT_COLUMNS} FROM errands_events WHERE owner = $1 AND seq > $2 AND seq <= $3 "
        "ORDER BY seq LIMIT $4"
    ),
    horizon="SELECT value::bigint FROM errands_meta WHERE key = 'horizon'",
    # -- provider reports
    receipts=f"SELECT {RECEIPTS.select} FROM errands_webhook_deliveries ORDER BY id DESC LIMIT $1",
    task_receipts=(
        f"SELECT {RECEIPTS.select} FROM errands_webhook_deliveries WHERE task_id = $1 ORDER BY id DESC LIMIT $2"
    ),
    # -- notifications
    insert_endpoint=f"INSERT INTO errands_endpoints ({ENDPOINTS.select}) VALUES ({_marks(len(ENDPOINTS.names))})",
    select_endpoint=f"SELECT {ENDPOINTS.select} FROM errands_endpoints WHERE id = $1",
    lock_endpoint=f"SELECT {ENDPOINTS.select} FROM errands_endpoints WHERE id = $1 FOR UPDATE",
    list_endpoints=f"SELECT {ENDPOINTS.select} FROM errands_endpoints ORDER BY id",
    update_endpoint=(
        "UPDATE errands_endpoints SET "
        + ", ".join(f"{c} = ${i}" for i, c in enumerate(ENDPOINTS.names[1:], start=2))
        + " WHERE id = $1"
    ),
    delete_endpoint="DELETE FROM errands_endpoints WHERE id = $1",
    fail_pending=(
        "UPDATE errands_messages SET state = 'failed', last_error = $1, lease_token = NULL, updated_at = $2 "
        "WHERE channel = 'endpoint' AND target = $3 AND state = 'pending'"
    ),
    set_health=(
        "UPDATE errands_endpoints SET failing_since = $1, throttled_until = $2, enabled = $3, "
        "disabled_reason = $4, updated_at = $5 WHERE id = $6"
    ),
    notify_cursor="SELECT value::bigint FROM errands_meta WHERE key = 'notify_cursor'",
    notify_urls_after=f"SELECT 1 FROM errands_events WHERE seq > $1 AND {_NOTIFY_URL_ENDS} LIMIT 1",
    init_notify_cursor=(
        "INSERT INTO errands_meta (key, value) VALUES ('notify_cursor', '0') ON CONFLICT DO NOTHING"
    ),
    move_notify_cursor="UPDATE errands_meta SET value = $1 WHERE key = 'notify_cursor' AND value = $2",
    insert_message=(
        f"INSERT INTO errands_messages ({MESSAGES.select}) VALUES ({_marks(len(MESSAGES.names))}) "
        "ON CONFLICT DO NOTHING"
    ),
    due_messages=(
        f"SELECT {_M}, {_E} FROM errands_messages m "
        "LEFT JOIN errands_endpoints e ON m.channel = 'endpoint' AND e.id = m.target "
        f"WHERE m.state = 'pending' AND m.next_at <= $1 AND {_CHANNELS.format('$2', '$3')} "
        "AND (m.channel != 'endpoint' OR (e.enabled AND coalesce(e.throttled_until, 0) <= $1)) "
        f"AND {FIRST_IN_LINE.format(messages='errands_messages')} "
        "ORDER BY m.next_at LIMIT $4 FOR UPDATE OF m SKIP LOCKED"
    ),
    claim_message=(
        "UPDATE errands_messages SET attempts = $1, next_at = $2, lease_token = $3, updated_at = $4 WHERE id = $5"
    ),
    message_ref="SELECT task_id, seq, final FROM errands_messages WHERE id = $1",
    insert_attempt=(
        f"INSERT INTO errands_message_attempts ({ATTEMPTS.select}) VALUES ({_marks(len(ATTEMPTS.names))})"
    ),
    finish_message=(
        "UPDATE errands_messages SET state = $1, next_at = $2, last_status = $3, last_error = $4, "
        "updated_at = $5, lease_token = NULL WHERE id = $6 AND lease_token = $7"
    ),
    final_left=(
        "SELECT 1 FROM errands_messages WHERE task_id = $1 AND seq = $2 AND final AND state != 'delivered' LIMIT 1"
    ),
    next_message_at=(
        f"SELECT min(m.next_at) FROM errands_messages m WHERE m.state = 'pending' AND {_CHANNELS.format('$1', '$2')}"
    ),
    select_message=f"SELECT {MESSAGES.select} FROM errands_messages WHERE id = $1",
    list_messages=(
        f"SELECT {MESSAGES.select} FROM errands_messages {{where}} ORDER BY created_at DESC, id DESC LIMIT {{limit}}"
    ),
    list_attempts=(
        f"SELECT {ATTEMPTS.select}, id FROM errands_message_attempts {{where}} ORDER BY id DESC LIMIT {{limit}}"
    ),
    resend_message=(
        "UPDATE errands_messages SET state = 'pending', attempts = 0, next_at = $1, lease_token = NULL, "
        f"updated_at = $1 WHERE id = $2 RETURNING {MESSAGES.select}"
    ),
    recover_endpoint=(
        "UPDATE errands_messages SET state = 'pending', attempts = 0, next_at = $1, lease_token = NULL, "
        "updated_at = $1 WHERE channel = 'endpoint' AND target = $2 AND state = 'failed' AND created_at >= $3"
    ),
    # -- credits
    lock_balance=(
        "SELECT owner, balance, reserved, updated_at FROM errands_credit_balances WHERE owner = $1 "
        "FOR UPDATE NOWAIT"
    ),
    set_balance=(
        "INSERT INTO errands_credit_balances (owner, balance, reserved, updated_at) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (owner) DO UPDATE SET balance = excluded.balance, reserved = excluded.reserved, "
        "updated_at = excluded.updated_at"
    ),
    insert_ledger=(
        "INSERT INTO errands_credit_ledger (owner, kind, amount, held, balance, reserved, at, task_id, note) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id"
    ),
    select_balance="SELECT owner, balance, reserved, updated_at FROM errands_credit_balances WHERE owner = $1",
    list_balances=(
        'SELECT owner, balance, reserved, updated_at FROM errands_credit_balances WHERE owner COLLATE "C" > $1 '
        'ORDER BY owner COLLATE "C" LIMIT $2'
    ),
    select_ledger=(
        f"SELECT {LEDGER_COLUMNS} FROM errands_credit_ledger WHERE owner = $1 AND id > $2 ORDER BY id LIMIT $3"
    ),
    select_all_ledger=f"SELECT {LEDGER_COLUMNS} FROM errands_credit_ledger WHERE id > $1 ORDER BY id LIMIT $2",
    usage=usage_sql(
        day="to_char(to_timestamp(floor(created_at)) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        tasks="errands_tasks",
        days="errands_usage_days",
        param=lambda n: f"${n}",
    ),
    add_usage=(
        "INSERT INTO errands_usage_days (day, owner, type, status, tasks, credits) VALUES ($1, $2, $3, $4, $5, $6) "
        "ON CONFLICT (day, owner, type, status) DO UPDATE SET tasks = errands_usage_days.tasks + excluded.tasks, "
        "credits = errands_usage_days.credits + excluded.credits"
    ),
    # -- meta
    hold=(
        "INSERT INTO errands_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = "
        "CASE WHEN errands_meta.value::float8 < excluded.value::float8 THEN excluded.value "
        "ELSE errands_meta.value END RETURNING value::float8"
    ),
    holds="SELECT key, value::float8 FROM errands_meta WHERE key >= 'hold:' AND key < 'hold;'",
    meta_setdefault=(
        # DO UPDATE rather than DO NOTHING plus a read: under READ COMMITTED, a key inserted by a
        # transaction that committed while this statement waited for it is invisible to the
        # statement's snapshot, but ON CONFLICT DO UPDATE locks and returns the committed row.
        "INSERT INTO errands_meta (key, value) VALUES ($1, $2) "
        "ON CONFLICT (key) DO UPDATE SET value = errands_meta.value RETURNING value"
    ),
    add_admin_key="INSERT INTO errands_admin_keys (hash, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    admin_keys="SELECT hash FROM errands_admin_keys",
)
#: The start-up race's statement, named for its test (tests/integration/test_postgres.py).
META_SETDEFAULT = STATEMENTS.meta_setdefault
