"""The SQL of the PostgreSQL store (`postgres.py`), one statement per operation.

Most operations are one statement, so one round trip and no session left in a transaction:
data-modifying CTEs fence the write on the claim, change the unfinished counter
(`offload_pending`) in the same statement, and return the task as it now is. `$slot` marks
the counter row a statement adds to; `{narrow}` and `{orphaned}` are filled in per use.
"""

from __future__ import annotations

from collections.abc import Collection

HISTORY_LIMIT = 10

COLUMNS = (
    "id, type, queue, state, payload, priority, run_at, created_at, timeout, max_attempts, "
    "attempts, attempt_floor, started_at, finished_at, result, last_error, history, changed, "
    "callback, callback_state, callback_attempts, callback_error"
)
CHANGE = "changed = nextval('offload_change_seq')"
T_COLUMNS = ", ".join(f"t.{c.strip()}" for c in COLUMNS.split(","))
FENCE = "id = $1 AND state = 'running' AND attempts = $2 AND owner = $3"
ALL_FENCE = "t.state = 'running' AND t.attempts = v.attempt AND t.owner = v.owner"
DB_NOW = "extract(epoch FROM clock_timestamp())"


# A CTE that makes its statement's commit skip the WAL flush. For lease renewals and rescues
# only: if the database crashes before the WAL writer flushes them (within
# wal_writer_delay), the lease is found shorter, or the task running under a lease that has
# expired and is rescued again, which changes nothing anyone was told. Any later durable
# commit flushes them anyway, since WAL is written in order: a task rescued and then claimed
# is never found running again once its claim has committed.
RELAXED = "relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"
# What must survive a crash of PostgreSQL commits with `synchronous_commit` at least `on`:
# admissions (a 202), claims (a handler starts on the strength of one: a claim undone by a
# crash lets the task be claimed again, under the same attempt, while the first run goes
# on), outcomes, put-backs and cancels. A server, database or role default of `off` would
# void that silently, so these transactions raise `off` to `on` themselves; a stricter
# setting (`remote_write`, `remote_apply`) or `local` is the operator's and is kept.
DURABLE_VALUE = (
    "CASE WHEN current_setting('synchronous_commit') = 'off' "
    "THEN set_config('synchronous_commit', 'on', true) END"
)
DURABLE_SETTING = f"SELECT {DURABLE_VALUE}"  # a statement of its own, in a transaction
DURABLE = f"durable AS (SELECT {DURABLE_VALUE} AS durable)"  # a CTE, joined to the result


def push_history(entry: str) -> str:
    """SQL for `history` with `entry` (jsonb) appended, keeping the last HISTORY_LIMIT."""
    h = "coalesce(t.history, '[]'::jsonb)"
    return (
        f"CASE WHEN jsonb_array_length({h}) >= {HISTORY_LIMIT} "
        f"THEN ({h} - 0) || {entry} ELSE {h} || {entry} END"
    )


def count_change(delta: str, source: str) -> str:
    """A CTE body adding `delta` to one `offload_pending` row ($slot) if `source` has rows."""
    return (
        f"UPDATE offload_pending SET n = n + ({delta}) "
        f"WHERE slot = $slot AND EXISTS (SELECT 1 FROM {source})"
    )


def _numbered(sql: str, first: int) -> str:
    """`sql` with its `$slot` placeholder numbered `first`."""
    return sql.replace("$slot", f"${first}")


ADMIT_SQL = _numbered(
    f"""
    WITH room AS (SELECT coalesce(sum(n), 0)::bigint AS pending FROM offload_pending),
    ins AS (
        INSERT INTO offload_tasks (id, type, queue, state, payload, priority, run_at,
                                   created_at, timeout, max_attempts, callback, callback_state)
        SELECT v.id, v.type, v.queue, 'queued', v.payload, v.priority, v.run_at,
               v.created_at, v.timeout, v.max_attempts, v.callback,
               CASE WHEN v.callback IS NULL THEN NULL ELSE 'pending' END
        FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::int[],
                    $6::float8[], $7::float8[], $8::float8[], $9::int[], $13::text[])
             WITH ORDINALITY
             AS v(id, type, queue, payload, priority, run_at, created_at, timeout,
                  max_attempts, callback, ord)
        WHERE (SELECT pending FROM room) + $10 <= $11
        ORDER BY v.ord
        RETURNING id, changed),
    counted AS ({count_change("SELECT count(*) FROM ins", "ins")})
    SELECT (SELECT pending FROM room) AS pending, (SELECT count(*) FROM ins) AS inserted,
           (SELECT array_agg(changed ORDER BY changed) FROM ins) AS changed
    """,
    12,
)

CLAIM_SQL = f"""
    WITH picked AS (
        SELECT id FROM offload_tasks
        WHERE state = 'queued' AND run_at <= $3 {{narrow}}
        ORDER BY priority DESC, id LIMIT $5 FOR UPDATE SKIP LOCKED),
    claimed AS (
        UPDATE offload_tasks t SET state = 'running', {CHANGE}, attempts = t.attempts + 1,
               owner = $1, lease_until = {DB_NOW} + $2,
               started_at = greatest($3, t.created_at)
        FROM picked WHERE t.id = picked.id
        RETURNING {T_COLUMNS})
    SELECT claimed.*, due.next_due
    FROM (SELECT CASE WHEN (SELECT count(*) FROM claimed) < $5 THEN
            (SELECT min(run_at) FROM offload_tasks
             WHERE state = 'queued' AND run_at > $3 {{narrow}}) END AS next_due) due
    LEFT JOIN claimed ON true
"""
# The claim runs in a transaction begun with these: a durable commit (see DURABLE), and a
# plan that walks the claim index in order and stops at LIMIT. Left free, the planner may
# collect every due task and sort them (it does when the statistics are stale, as after a
# bulk admission into a new table), at 1000 times the cost.
CLAIM_SETTINGS = (
    f"SET LOCAL enable_sort TO off; SET LOCAL enable_bitmapscan TO off; {DURABLE_SETTING}"
)
# Admission's first statement: the admission lock, and a durable commit.
ADMIT_LOCK_SQL = f"SELECT pg_advisory_xact_lock($1, $2), {DURABLE_VALUE}"
# Paused queues run nothing on any node, whatever the caller's own list says.
NOT_PAUSED = "AND queue NOT IN (SELECT name FROM offload_queues WHERE paused)"
_NARROW = {
    None: "AND ${n}::text IS NULL",
    "only": "AND {column} = ${n}::text",
    "skip": "AND {column} <> ALL(${n}::text[])",
}


def _narrowing(mode: str | None, column: str, n: int) -> str:
    return _NARROW[mode].format(column=column, n=n)


def claim_sql(by_type: str | None, by_queue: str | None) -> str:
    """The claim narrowed by type ($4) and queue ($6): None, "only" or "skip" each."""
    narrow = " ".join(
        (_narrowing(by_type, "type", 4), _narrowing(by_queue, "queue", 6), NOT_PAUSED)
    )
    return CLAIM_SQL.replace("{narrow}", narrow)


def claim_filter(
    only: str | None, skip: Collection[str]
) -> tuple[str | None, str | list[str] | None]:
    """The claim_sql mode ("only", "skip" or None) of a filter, and its argument."""
    if only is not None:
        return "only", only
    if skip:
        return "skip", list(skip)
    return None, None


# One statement each: the update fenced on the claim and, for an ending, the count.
# Many successes in one statement (group commit): v holds one row per claim.
SUCCEEDED_MANY_SQL = _numbered(
    f"""
    WITH {DURABLE},
    v AS (
        SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bytea[], $5::float8[])
        AS v(id, attempt, owner, result, finished_at)),
    done AS (
        UPDATE offload_tasks t SET state = 'succeeded', {CHANGE}, result = v.result,
               finished_at = v.finished_at, owner = NULL, lease_until = NULL
        FROM v WHERE t.id = v.id AND {ALL_FENCE}
        RETURNING {T_COLUMNS}),
    counted AS ({count_change("-(SELECT count(*) FROM done)", "done")})
    SELECT done.* FROM done CROSS JOIN durable
    """,
    6,
)
FAILED_SQL = _numbered(
    f"""
    WITH {DURABLE},
    done AS (
        UPDATE offload_tasks t SET state = 'failed', {CHANGE}, finished_at = $4, last_error = $5,
               history = {push_history("$6::jsonb")}, owner = NULL, lease_until = NULL
        WHERE {FENCE} RETURNING {T_COLUMNS}),
    counted AS ({count_change("-1", "done")})
    SELECT done.* FROM done CROSS JOIN durable
    """,
    7,
)
RETRY_SQL = f"""
    WITH {DURABLE},
    done AS (
        UPDATE offload_tasks t SET state = 'queued', {CHANGE}, run_at = $4, last_error = $5,
               history = {push_history("$6::jsonb")}, owner = NULL, lease_until = NULL
        WHERE {FENCE} RETURNING {T_COLUMNS})
    SELECT done.* FROM done CROSS JOIN durable
"""
RELEASED_SQL = f"""
    WITH {DURABLE},
    done AS (
        UPDATE offload_tasks SET state = 'queued', {CHANGE}, attempts = attempts - 1, owner = NULL,
               lease_until = NULL, started_at = NULL
        WHERE {FENCE} RETURNING {COLUMNS})
    SELECT done.* FROM done CROSS JOIN durable
"""
CANCEL_SQL = _numbered(
    f"""
    WITH {DURABLE},
    o AS (SELECT id, state, owner FROM offload_tasks WHERE id = $1 FOR UPDATE),
    done AS (
        UPDATE offload_tasks t SET state = 'cancelled', {CHANGE}, finished_at = $2, owner = NULL,
               lease_until = NULL
        FROM o WHERE t.id = o.id AND o.state IN ('queued', 'running')
        RETURNING {T_COLUMNS}),
    counted AS ({count_change("-1", "done")})
    SELECT o.state AS before, o.owner AS before_owner, done.*
    FROM o LEFT JOIN done ON true CROSS JOIN durable
    """,
    3,
)
RETRY_TASK_SQL = _numbered(
    f"""
    WITH done AS (
        UPDATE offload_tasks SET state = 'queued', {CHANGE}, attempt_floor = attempts,
               run_at = $2, started_at = NULL, finished_at = NULL, result = NULL,
               callback_attempts = 0, callback_next = 0, callback_error = NULL,
               callback_state = CASE WHEN callback IS NULL THEN NULL ELSE 'pending' END
        WHERE id = $1 RETURNING {COLUMNS}),
    counted AS ({count_change("1", "done")})
    SELECT * FROM done
    """,
    3,
)
# The history entry of an interrupted run, as SQL ($1: now, $2: the error).
INTERRUPTED_ENTRY = (
    "jsonb_build_object('attempt', t.attempts, 'started_at', coalesce(t.started_at, $1), "
    "'duration', greatest(0, $1 - coalesce(t.started_at, $1)), 'error', $2::text)"
)
ATTEMPTS_LEFT = "t.attempts - t.attempt_floor < t.max_attempts"
# Put back (or fail, with no attempt left) running tasks chosen by {orphaned}, counting the
# interrupted run as an attempt; the same rules as the SQLite store's recover().
RESCUE_SQL = _numbered(
    f"""
    WITH {RELAXED},
    o AS (
        SELECT id, owner FROM offload_tasks t
        WHERE state = 'running' AND ({{orphaned}})
        ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED),
    rescued AS (
        UPDATE offload_tasks t SET {CHANGE},
            state = CASE WHEN {ATTEMPTS_LEFT} THEN 'queued' ELSE 'failed' END,
            run_at = CASE WHEN {ATTEMPTS_LEFT} THEN $1 ELSE t.run_at END,
            finished_at = CASE WHEN {ATTEMPTS_LEFT} THEN NULL ELSE $1 END,
            last_error = $2,
            history = {push_history(INTERRUPTED_ENTRY)},
            owner = NULL, lease_until = NULL
        FROM o WHERE t.id = o.id
        RETURNING o.owner AS was_owner, {T_COLUMNS}),
    failed AS (SELECT 1 FROM rescued WHERE state = 'failed'),
    counted AS ({count_change("-(SELECT count(*) FROM failed)", "failed")})
    SELECT rescued.* FROM rescued CROSS JOIN relaxed
    """,
    4,
)
RESCUE_EXPIRED = RESCUE_SQL.replace("{orphaned}", f"lease_until < {DB_NOW}")
# At start: the runs of this daemon's own name too, lease or not. The name's liveness lock,
# taken just before, proves the process that held it is gone. Other owners' runs wait for
# their leases: that no session holds an owner's liveness lock at one instant proves
# nothing (a live daemon's listener may be reconnecting, or waiting for the server to end
# its old session), and taking an unexpired lease would run the task twice at once.
RECOVER = RESCUE_SQL.replace("{orphaned}", f"owner = $5 OR lease_until < {DB_NOW}")
CALLBACK_LEASE = 60.0  # seconds a node has to deliver the callbacks it took
CALLBACK_DUE = "callback_state = 'pending' AND state IN ('succeeded', 'failed', 'cancelled')"
DUE_CALLBACKS_SQL = f"""
    WITH picked AS (
        SELECT id FROM offload_tasks WHERE {CALLBACK_DUE} AND callback_next <= $1
        ORDER BY callback_next LIMIT $2 FOR UPDATE SKIP LOCKED),
    taken AS (
        UPDATE offload_tasks t SET callback_next = $1 + $3
        FROM picked WHERE t.id = picked.id RETURNING {T_COLUMNS})
    SELECT taken.*, later.later
    FROM (SELECT min(callback_next) AS later FROM offload_tasks
          WHERE {CALLBACK_DUE} AND callback_next > $1) later
    LEFT JOIN taken ON true
"""
RESCUE_BATCH = 500
UNBOUNDED = 2**62  # a max_pending that never binds
INTERRUPTED = "interrupted: the daemon stopped (crash or kill) with this run claimed or under way"
LEASE_EXPIRED = "interrupted: the daemon running it stopped renewing its lease (crash, freeze)"

KEEP_KEY_SQL = """
    INSERT INTO offload_idempotency (scope, key, fingerprint, task_ids, created_at)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,
        task_ids = excluded.task_ids, created_at = excluded.created_at
"""
