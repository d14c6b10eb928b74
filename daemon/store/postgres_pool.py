"""Opening the PostgreSQL store: the connection pool with its session settings, the schema
migrated under an advisory lock, and this node's background work started; all closed in
reverse order on exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from daemon import redact
from daemon.config import StoreConfig
from daemon.errors import ConfigError, StoreUnavailable
from daemon.store.base import Hooks
from daemon.store.postgres import PostgresStore
from daemon.store.postgres_connections import ACQUIRE_TIMEOUT
from daemon.store.postgres_errors import describe, unavailable
from daemon.store.postgres_node import Node
from daemon.store.postgres_schema import (
    SchemaTooNew,
    migrate,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open one connection
COMMAND_TIMEOUT = 30.0  # seconds for one statement; past it the database counts as gone
SESSION_SETTINGS = {
    "application_name": "offload",
    # A safety net: our transactions last milliseconds; a session stuck in one (a frozen
    # daemon) is ended by the server so its locks go with it.
    "idle_in_transaction_session_timeout": "5s",
    # A daemon that vanished without closing its sockets is noticed within ~30 s.
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "4",
}


async def _no_reset(conn: Any) -> None:
    """Pool connections carry no session state (no LISTEN, no session locks, no SET), so
    the default reset query, one more round trip per release, is not needed; asyncpg rolls
    back an open transaction before this is called."""
    return None


@asynccontextmanager
async def open_postgres(config: StoreConfig, hooks: Hooks) -> AsyncIterator[PostgresStore]:
    """Connect, migrate and start this node's background work (listener, heartbeat,
    rescue, hints); on exit stop it, end the listener session (and with it this node's
    liveness lock), then close the pool. An unreachable database raises `StoreUnavailable`
    naming it without its password."""
    where = redact.url(config.url)
    try:
        pool = await asyncpg.create_pool(
            config.url,
            min_size=1,
            max_size=config.pool_size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=SESSION_SETTINGS,
            reset=_no_reset,
        )
    except Exception as exc:
        if unavailable(exc) or isinstance(exc, asyncpg.PostgresError | ValueError):
            raise StoreUnavailable(f"cannot connect to {where}: {describe(exc)}") from exc
        raise
    try:
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                await migrate(conn)
        except SchemaTooNew as exc:
            # An older offload on a newer database: no restart mends that (exit 78).
            raise ConfigError(
                where, [f"store.url: {exc}; run that newer offload, or restore a backup"]
            ) from exc
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(f"cannot migrate {where}: {describe(exc)}") from exc
            raise
        node = Node(pool, config.url, hooks, SESSION_SETTINGS, CONNECT_TIMEOUT)
        store = PostgresStore(pool, node, f"{where} (pool {config.pool_size})")
        async with node.running(store.rescue_expired):
            yield store
    finally:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await pool.close()
        except TimeoutError:
            pool.terminate()
