"""The SQLite hot path as whole-batch statements: claim, record successes, admit.

Every step of a statement through the `sqlite3` module lets go of the GIL and then waits to
take it back; with the event loop busy that wait lasts up to the interpreter's switch
interval. A statement per task, or a row per task read back, made the writer thread spend
more time waiting for the GIL than working. So each statement here handles the whole batch
in one step: the rows go in as one JSON parameter (`json_each`) and come out as one JSON
value (`json_group_array`). Blobs travel as hex on the way out, and as JSON strings on the
way in (payloads and results are UTF-8 JSON text, checked at admission and at encoding).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import msgspec

from daemon.models import Claim, Succeeded, Task, TaskState, decode_history

# The values each claimed row comes out with, in order (see `_Row`). JSON numbers from
# SQLite carry 15 digits, so the times travel as text with all 17 a double needs.
_COLUMNS = (
    "seq, id, type, queue, hex(payload), priority, printf('%!.17g', run_at), "
    "printf('%!.17g', created_at), printf('%!.17g', timeout), max_attempts, "
    "attempts, attempt_floor, last_error, hex(history), callback, callback_state, "
    "callback_attempts, callback_error"
)
_Row = tuple[
    int, str, str, str, str, int, str, str, str, int,
    int, int, str | None, str, str | None, str | None,
    int, str | None,
]  # fmt: skip
_rows = msgspec.json.Decoder(list[_Row])
_changes = msgspec.json.Decoder(list[int])
_encode = msgspec.json.encode


# Deferred tasks that came due become claimable, the earliest first, this many per claim
# (a claim that leaves some behind reports a next due time already past, so the feeder
# claims again at once).
PROMOTE_ROWS = 5000

# Arguments: now.
PROMOTE_SQL = (
    "UPDATE tasks SET deferred = 0 WHERE seq IN (SELECT seq FROM tasks INDEXED BY "
    "tasks_next_due WHERE state = 'queued' AND deferred = 1 AND run_at <= ? "
    f"ORDER BY run_at LIMIT {PROMOTE_ROWS})"
)


def claim_sql(narrow: str) -> str:
    """Up to `limit` claimable tasks as one JSON array, and the earliest `run_at` of the
    deferred ones. Arguments: *narrow, limit, *narrow."""
    return (
        f"SELECT (SELECT json_group_array(json_array({_COLUMNS})) FROM ("
        f"SELECT * FROM tasks INDEXED BY tasks_claim WHERE state = 'queued' AND deferred = 0"
        f"{narrow} ORDER BY priority DESC, seq LIMIT ?)), "
        f"(SELECT min(run_at) FROM tasks INDEXED BY tasks_next_due "
        f"WHERE state = 'queued' AND deferred = 1{narrow})"
    )


Row = _Row


def take(conn: sqlite3.Connection, found: str, *, first_change: int, owner: str, now: float,
         lease_until: float) -> list[Row]:  # fmt: skip
    """In the writer thread: mark the rows `claim_sql` found as running for `owner`, each
    with its own change number from `first_change` on; returns them highest priority first
    for `claims()` to make into claims on the event loop. A run starts no earlier than its
    task was created or came due: the caller's `now` may predate an admission or a retry
    that the claim finds (the writer commits those ahead of claims)."""
    rows = _rows.decode(found)
    if not rows:
        return []
    rows.sort(key=lambda r: (-r[5], r[0]))
    conn.execute(
        "UPDATE tasks SET state = 'running', attempts = attempts + 1, owner = ?, "
        "lease_until = ?, started_at = max(?, run_at, created_at), changed = ? + j.key "
        "FROM (SELECT key, value FROM json_each(?)) AS j WHERE tasks.seq = j.value",
        (owner, lease_until, now, first_change, _encode([r[0] for r in rows])),
    )
    return rows


def claims(rows: list[Row], *, first_change: int, owner: str, now: float,
           lease_until: float) -> list[Claim]:  # fmt: skip
    """The claims `take()` made, as the rows now are."""
    claims = []
    for i, r in enumerate(rows):
        attempt = r[10] + 1
        run_at, created_at = float(r[6]), float(r[7])
        # Positional, in Task's order: keywords made a claim's task take four times as long.
        task = Task(
            r[1],  # id
            r[2],  # type
            r[3],  # queue
            TaskState.RUNNING,
            bytes.fromhex(r[4]),  # payload
            r[5],  # priority
            run_at,
            created_at,
            float(r[8]),  # timeout
            r[9],  # max_attempts
            attempt,  # attempts
            r[11],  # attempt_floor
            max(now, run_at, created_at),  # started_at: see take()
            None,  # finished_at
            None,  # result
            r[12],  # last_error
            decode_history(bytes.fromhex(r[13])) if r[13] else (),
            r[14],  # callback
            r[15],  # callback_state
            r[16],  # callback_attempts
            r[17],  # callback_error
            first_change + i,  # changed
        )
        claims.append(Claim(task, owner, attempt, lease_until))
    return claims


def succeed(
    conn: sqlite3.Connection, done: Sequence[tuple[Claim, Succeeded]], first_change: int
) -> set[int]:
    """Record these successes, fenced on each claim; the change number of the i-th is
    `first_change + i`. Returns the positions of those whose claim was lost."""
    items = [
        (
            c.task.id,
            c.attempt,
            c.owner,
            o.finished_at,
            None if o.result is None else o.result.decode(),
        )
        for c, o in done
    ]
    applied = conn.execute(
        # `+tasks.state`: the planner must look each row up by id, not walk every running row.
        "UPDATE tasks SET state = 'succeeded', changed = ? + j.n, result = CAST(j.r AS BLOB), "
        "finished_at = j.f, owner = NULL, lease_until = NULL FROM (SELECT key AS n, "
        "json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS a, "
        "json_extract(value, '$[2]') AS o, json_extract(value, '$[3]') AS f, "
        "json_extract(value, '$[4]') AS r FROM json_each(?)) AS j "
        "WHERE tasks.id = j.id AND +tasks.state = 'running' AND tasks.attempts = j.a "
        "AND tasks.owner = j.o",
        (first_change, _encode(items)),
    ).rowcount
    if applied == len(items):
        return set()
    kept = conn.execute(
        "SELECT json_group_array(changed) FROM tasks WHERE changed BETWEEN ? AND ?",
        (first_change, first_change + len(items) - 1),
    ).fetchone()[0]
    return set(range(len(items))) - {c - first_change for c in _changes.decode(kept)}
