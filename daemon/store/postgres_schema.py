"""The PostgreSQL schema, versioned in `offload_schema`; `migrate()` runs at every open.

Several daemons may start at once: the migration runs in one transaction under an advisory
lock, so one of them migrates and the others wait, then find the schema current. The same
transaction recounts the unfinished-task counter (`offload_pending`), so a hand edit of the
table cannot leave admission wrong for longer than until the next daemon starts.
"""

from __future__ import annotations

from typing import Any

# Advisory lock keys: (LOCK_SPACE, n). Transaction-scoped except the liveness lock.
LOCK_SPACE = 1_868_983_396  # "ofld"
MIGRATE_LOCK = 0
ADMIT_LOCK = 1
# Each daemon holds pg_advisory_lock(LIVENESS_SPACE, hashtext(owner)) on its listener
# connection while it lives (retaken after each reconnect): two live daemons cannot share a
# name, and a process that takes its name's lock knows the earlier holder is gone.
LIVENESS_SPACE = LOCK_SPACE + 1
PENDING_SLOTS = 16  # rows of the unfinished counter, so completions rarely wait on each other

# Each entry moves the schema from version i to i + 1. Never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE offload_tasks (
        id            text COLLATE "C" PRIMARY KEY,
        type          text             NOT NULL,
        queue         text             NOT NULL,
        state         text             NOT NULL,
        payload       bytea            NOT NULL,
        priority      integer          NOT NULL,
        run_at        double precision NOT NULL,
        created_at    double precision NOT NULL,
        timeout       double precision NOT NULL,
        max_attempts  integer          NOT NULL,
        attempts      integer          NOT NULL DEFAULT 0,
        attempt_floor integer          NOT NULL DEFAULT 0,
        started_at    double precision,
        finished_at   double precision,
        result        bytea,
        last_error    text,
        history       jsonb,
        owner         text,
        lease_until   double precision,
        changed       bigint           NOT NULL,
        callback          text,
        callback_state    text,
        callback_attempts integer          NOT NULL DEFAULT 0,
        callback_next     double precision NOT NULL DEFAULT 0,
        callback_error    text,
        CONSTRAINT offload_tasks_state_known
            CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'))
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
    -- Ids are time-ordered (ULIDs), so id order is age: "oldest first" and "newest first"
    -- walk an index of ids. The claim walks this partial index in order: it holds only
    -- what may be claimed.
    -- Every state change takes the next value: the event stream resumes from one.
    CREATE SEQUENCE offload_change_seq;
    ALTER TABLE offload_tasks ALTER COLUMN changed SET DEFAULT nextval('offload_change_seq');
    CREATE INDEX offload_tasks_changed ON offload_tasks (changed);
    CREATE INDEX offload_tasks_claim ON offload_tasks (priority DESC, id)
        WHERE state = 'queued';
    CREATE INDEX offload_tasks_next_due ON offload_tasks (run_at) WHERE state = 'queued';
    -- The rescue finds expired leases here; it holds only running tasks.
    CREATE INDEX offload_tasks_lease ON offload_tasks (lease_until) WHERE state = 'running';
    -- Listing by state walks the primary key (ids are time-ordered) except for the rare
    -- states; no index on every state, since each would take an entry at every change.
    CREATE INDEX offload_tasks_rare ON offload_tasks (id) WHERE state IN ('failed', 'cancelled');
    CREATE INDEX offload_tasks_unfinished ON offload_tasks (queue, state)
        WHERE state IN ('queued', 'running');
    CREATE INDEX offload_tasks_finished ON offload_tasks (finished_at)
        WHERE finished_at IS NOT NULL;
    CREATE INDEX offload_tasks_callbacks ON offload_tasks (callback_next)
        WHERE callback_state = 'pending' AND state IN ('succeeded', 'failed', 'cancelled');
    -- Unfinished tasks, as the sum of PENDING_SLOTS rows: admission reads the sum under
    -- ADMIT_LOCK; every change of the count adds to one row in the same transaction.
    CREATE TABLE offload_pending (slot smallint PRIMARY KEY, n bigint NOT NULL);
    INSERT INTO offload_pending SELECT s, 0 FROM generate_series(0, {PENDING_SLOTS - 1}) s;
    CREATE TABLE offload_queues (
        name   text    PRIMARY KEY,
        paused boolean NOT NULL DEFAULT false
    );
    CREATE TABLE offload_schedules (
        name      text    PRIMARY KEY,
        last_fire double precision,
        paused    boolean NOT NULL DEFAULT false
    );
    CREATE TABLE offload_idempotency (
        scope       text             NOT NULL,
        key         text             NOT NULL,
        fingerprint bytea            NOT NULL,
        task_ids    text[]           NOT NULL,
        created_at  double precision NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX offload_idempotency_age ON offload_idempotency (created_at);
    """,
)

LATEST = len(MIGRATIONS)


class SchemaTooNew(Exception):
    pass


async def migrate(conn: Any) -> int:
    """Bring the schema to `LATEST` and recount `offload_pending`, in one transaction under
    the migration lock; returns the version found. `conn` is an asyncpg connection."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE, MIGRATE_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS offload_schema (version integer NOT NULL)")
        found = await conn.fetchval("SELECT max(version) FROM offload_schema") or 0
        if found > LATEST:
            raise SchemaTooNew(
                f"the database has schema version {found}, this offload knows up to {LATEST}"
            )
        for version in range(found, LATEST):
            await conn.execute(MIGRATIONS[version])
        if found < LATEST:
            await conn.execute("DELETE FROM offload_schema")
            await conn.execute("INSERT INTO offload_schema (version) VALUES ($1)", LATEST)
        await recount(conn)
    return int(found)


async def recount(conn: Any) -> None:
    """Set `offload_pending` to the true count. The table lock makes completions wait for
    the recount (they would otherwise subtract from a total that does not include them yet);
    admissions wait too, since they add to a row. Call inside a transaction."""
    await conn.execute("LOCK TABLE offload_pending IN EXCLUSIVE MODE")
    await conn.execute(
        "UPDATE offload_pending SET n = CASE WHEN slot = 0 THEN (SELECT count(*) FROM "
        "offload_tasks WHERE state IN ('queued', 'running')) ELSE 0 END"
    )
