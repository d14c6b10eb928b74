"""The SQLite schema, versioned through `PRAGMA user_version`; `migrate()` runs at open."""

from __future__ import annotations

import sqlite3

# Each entry moves the schema from version i to i + 1. Never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        seq           INTEGER PRIMARY KEY,
        id            TEXT    NOT NULL UNIQUE,
        type          TEXT    NOT NULL,
        queue         TEXT    NOT NULL,
        state         TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        priority      INTEGER NOT NULL,
        run_at        REAL    NOT NULL,
        created_at    REAL    NOT NULL,
        timeout       REAL    NOT NULL,
        max_attempts  INTEGER NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        attempt_floor INTEGER NOT NULL DEFAULT 0,
        started_at    REAL,
        finished_at   REAL,
        result        BLOB,
        last_error    TEXT,
        history       BLOB,
        owner         TEXT,
        lease_until   REAL
    );
    -- The claim walks this partial index in order: it holds only what may be claimed.
    CREATE INDEX tasks_claim ON tasks (priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX tasks_next_due ON tasks (run_at) WHERE state = 'queued';
    CREATE INDEX tasks_running ON tasks (owner) WHERE state = 'running';
    CREATE INDEX tasks_state ON tasks (state, seq);
    CREATE INDEX tasks_unfinished ON tasks (queue, state) WHERE state IN ('queued', 'running');
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    """,
    """
    CREATE TABLE queues (
        name   TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE schedules (
        name      TEXT PRIMARY KEY,
        last_fire REAL,
        paused    INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE idempotency (
        scope       TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        task_ids    BLOB NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX idempotency_age ON idempotency (created_at);
    ALTER TABLE tasks ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN callback TEXT;
    ALTER TABLE tasks ADD COLUMN callback_state TEXT;
    ALTER TABLE tasks ADD COLUMN callback_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN callback_next REAL NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN callback_error TEXT;
    CREATE INDEX tasks_callbacks ON tasks (callback_next) WHERE callback_state = 'pending'
        AND state IN ('succeeded', 'failed', 'cancelled');
    CREATE INDEX tasks_changed ON tasks (changed);
    """,
    # A task queued for later (delayed, or a retry after backoff) is `deferred` until a
    # claim finds it due; the claim index then holds only what may run now, so a claim
    # never walks past a million tasks queued for next week. Two indexes no query needs
    # any more go: the writer counts unfinished tasks per queue in memory
    # (sqlite_unfinished.py), and fenced writes find a running row by its id.
    """
    ALTER TABLE tasks ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET deferred = 1 WHERE state = 'queued' AND run_at > created_at;
    DROP INDEX tasks_claim;
    DROP INDEX tasks_next_due;
    CREATE INDEX tasks_claim ON tasks (priority DESC, seq) WHERE state = 'queued'
        AND deferred = 0;
    CREATE INDEX tasks_next_due ON tasks (run_at) WHERE state = 'queued' AND deferred = 1;
    DROP INDEX tasks_running;
    DROP INDEX tasks_unfinished;
    """,
)

LATEST = len(MIGRATIONS)


class SchemaTooNew(Exception):
    pass


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to `LATEST` in one transaction; returns the version found.
    Statements are split on ";", so none may contain one (comments included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > LATEST:
            raise SchemaTooNew(
                f"the database has schema version {found}, this offload knows up to {LATEST}"
            )
        for version in range(found, LATEST):
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {LATEST}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
