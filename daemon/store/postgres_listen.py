"""The listener session of a PostgreSQL node (daemon/store/postgres_node.py): one
connection of its own, outside the pool, that LISTENs for the other nodes' hints and holds
this daemon's liveness locks (see `PostgresStore.recover`). It is apart from the node
because its life is the connection's: it connects, watches the session, and reconnects on
its own (retaking the locks, every second until the server has let the old session's go,
and catching up on hints lost meanwhile), while the node's
lease renewal, rescue and hint sending go through the pool and never wait on it. Nothing
here raises out of `run()`: an unreachable database is handed to the node's `warn` and
tried again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from daemon.errors import StoreLocked, StoreUnavailable
from daemon.store.base import Hooks
from daemon.store.postgres_errors import describe, unavailable
from daemon.store.postgres_schema import LIVENESS_SPACE

logger = logging.getLogger(__name__)

WORK, ENDED, LOST = "offload_work", "offload_ended", "offload_lost"
PING_EVERY = 5.0  # seconds between checks that the listener connection still answers
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0  # seconds between tries to reconnect the listener
BECOME_TRIES = 10  # tries (one a second) to take an owner's liveness lock at start
RETAKE_EVERY = 1.0  # seconds between tries to take back a liveness lock the session lacks


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    def set_it(_conn: Any) -> None:
        event.set()

    return set_it


class Listener:
    """The listener session and the owner names this daemon serves as. Only the event loop
    touches it.

    `lose(task_id, why)` is called for a run of ours cancelled on another node,
    `reconnected()` after the session came back (hints sent meanwhile were lost), and
    `warn(what, exc)` when the database cannot be reached."""

    def __init__(
        self,
        url: str,
        settings: dict[str, str],
        connect_timeout: float,
        hooks: Hooks,
        *,
        lose: Callable[[str, str], None],
        reconnected: Callable[[], None],
        warn: Callable[[str, BaseException], None],
    ) -> None:
        self._url = url
        self._settings = settings
        self._connect_timeout = connect_timeout
        self._hooks = hooks
        self._lose = lose
        self._reconnected = reconnected
        self._warn = warn
        self.owners: set[str] = set()
        # Owners whose liveness lock the current session could not take (the server still
        # holds the lock for our previous session, or another daemon took the name): tried
        # again every RETAKE_EVERY seconds until held.
        self.missing: set[str] = set()
        self.me = ""  # the owner named at recover(); hints carry it to skip our own
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()

    async def become(self, owner: str) -> None:
        """Serve as `owner` from now on: hold its liveness lock on the listener session.
        Raises `StoreLocked` if another live daemon holds it (two daemons with one name
        would share their fences), `StoreUnavailable` if there is no listener session."""
        self.me = owner
        for attempt in range(BECOME_TRIES):
            try:
                async with asyncio.timeout(self._connect_timeout * 2):
                    await self._connected.wait()
                    async with self._lock:
                        conn = self._conn
                        taken = conn is not None and await self._take_liveness(conn, owner)
                        if taken:  # from now on retaken by every new listener session
                            self.owners.add(owner)
            except TimeoutError:
                raise StoreUnavailable("PostgreSQL cannot be reached (no listener)") from None
            except Exception as exc:
                if unavailable(exc):
                    raise StoreUnavailable(
                        f"PostgreSQL cannot be reached: {describe(exc)}"
                    ) from exc
                raise
            if taken:
                return
            if attempt < BECOME_TRIES - 1:
                # An earlier process of this name may be ending: its session goes soon.
                await asyncio.sleep(1.0)
        raise StoreLocked(
            f"another offload daemon named {owner!r} is alive on this database; give each "
            f"daemon its own host name"
        )

    async def _take_liveness(self, conn: Any, owner: str) -> bool:
        return bool(
            await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", LIVENESS_SPACE, owner
            )
        )

    async def run(self) -> None:
        pause = RECONNECT_MIN
        first = True
        while True:
            try:
                conn = await asyncpg.connect(
                    self._url, timeout=self._connect_timeout, server_settings=self._settings
                )
            except Exception as exc:
                if not unavailable(exc):
                    logger.exception("listener cannot connect", extra={"event": "store.bug"})
                self._warn("listener", exc)
                await asyncio.sleep(pause)
                pause = min(RECONNECT_MAX, pause * 2)
                continue
            try:
                gone = asyncio.Event()
                conn.add_termination_listener(_setter(gone))
                for channel in (WORK, ENDED, LOST):
                    await conn.add_listener(channel, self._on_notify)
                async with self._lock:
                    await self._retake(conn, self.owners)
                self._conn = conn
                self._connected.set()
                pause = RECONNECT_MIN
                if not first:
                    logger.info("listener reconnected", extra={"event": "store.reconnected"})
                    # Hints sent meanwhile were lost: look for work and for lost runs now.
                    self._hooks.on_new_work()
                    self._reconnected()
                first = False
                await self._watch(conn, gone)
            except Exception as exc:
                if not unavailable(exc):
                    logger.exception("listener failed", extra={"event": "store.bug"})
                self._warn("listener", exc)
            finally:
                self._connected.clear()
                self._conn = None
                conn.terminate()
            await asyncio.sleep(pause)

    async def _retake(self, conn: Any, owners: set[str]) -> None:
        """Take the liveness locks of `owners` on the session `conn`: log each one lost
        (once, until it is held again) and each one taken back."""
        for owner in sorted(owners):
            if await self._take_liveness(conn, owner):
                if owner in self.missing:
                    self.missing.discard(owner)
                    logger.warning(
                        "took back the liveness lock of %s: a daemon started under this name "
                        "is refused again",
                        owner,
                        extra={"event": "store.owner_retaken"},
                    )
            elif owner not in self.missing:
                self.missing.add(owner)
                logger.error(
                    "the listener session came back without the liveness lock of %s: the "
                    "database still holds it for this daemon's previous session (it ends "
                    "once the server notices that connection is gone), or another daemon "
                    "took the name; until it is taken back, a daemon started under this name "
                    "would not be refused (and would take this one's running tasks). Trying "
                    "again every %gs",
                    owner,
                    RETAKE_EVERY,
                    extra={"event": "store.owner_lost"},
                )

    async def _watch(self, conn: Any, gone: asyncio.Event) -> None:
        """Return when the listener session ends or stops answering; meanwhile take back
        the liveness locks it lacks."""
        while not gone.is_set():
            try:
                async with asyncio.timeout(RETAKE_EVERY if self.missing else PING_EVERY):
                    await gone.wait()
                    return
            except TimeoutError:
                pass
            async with asyncio.timeout(PING_EVERY), self._lock:
                if self.missing:
                    await self._retake(conn, self.missing.copy())  # a round trip: a ping
                else:
                    await conn.fetchval("SELECT 1")

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        sender, _, body = payload.partition("|")
        if sender == self.me:
            return  # our own hint: we acted on it already
        if channel == WORK:
            self._hooks.on_new_work()
        elif channel == ENDED:
            for task_id in body.split(","):
                self._hooks.on_ended(task_id)
        elif channel == LOST:
            for item in body.split(","):
                owner, _, task_id = item.rpartition(" ")
                if owner in self.owners:
                    self._lose(task_id, "cancelled on another node")
