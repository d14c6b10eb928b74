"""Which asyncpg errors mean "PostgreSQL cannot serve us right now" (and so become
`StoreUnavailable`, or a warning and another try, instead of a bug report). Every part of
the PostgreSQL store asks the same question (the store's operations, the pool, the node's
background tasks and its listener), so the answer lives in one module that depends on none
of them.
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # "cannot switch to state ...": a connection the server ended in the middle of a
    # statement (an admin shutdown); the pool discards it.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now, cancel
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after a failover
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.TransactionRollbackError,  # deadlock or serialisation: try again
)


def unavailable(exc: BaseException) -> bool:
    """Whether `exc`, raised by asyncpg, means the database cannot serve us right now."""
    return isinstance(exc, _UNAVAILABLE)


def describe(exc: BaseException) -> str:
    """`exc`'s message, or its type's name when it has none (a timeout's is empty)."""
    return str(exc) or type(exc).__name__
