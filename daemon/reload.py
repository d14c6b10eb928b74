"""Reload on SIGHUP: re-read the config file and apply what can change while running.

Task types (added, changed, removed), the log level, `[workers]` (concurrency grows at once,
shrinks as consumers finish their current task), `[auth]` tokens and the admission limits
apply at once; event streams whose caller the new tokens no longer let in end. `[server]` and
`[store]` need a restart: a change there is logged and kept for the next start. A file that
does not validate changes nothing, nor does one that leaves no token while the daemon
listens on a non-loopback socket (the rule `offload serve` applies at start, held to the
sockets bound, which systemd may have passed whatever `server.listen` says). Running tasks
keep the executor they started with. A SIGHUP once the daemon is stopping is logged and
skipped.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import msgspec

from daemon import logs
from daemon.auth import Token, TokenFileError, load_tokens
from daemon.config import Config, load, queue_settings
from daemon.errors import ConfigError
from daemon.executors.http import HttpClient
from daemon.http_server import is_loopback
from daemon.runtime import Runtime
from daemon.systemd import Notifier
from daemon.tasktypes import build_types

logger = logging.getLogger(__name__)


async def reload_on_request(
    rt: Runtime,
    path: str,
    *,
    requested: asyncio.Event,
    threads: ThreadPoolExecutor,
    http: HttpClient,
    notifier: Notifier,
) -> None:
    """Each time `requested` is set, reload `path` (see the module docstring)."""
    while True:
        await requested.wait()
        requested.clear()
        if rt.draining.is_set():
            # systemd is told STOPPING=1 by then; a READY=1 after it would say otherwise. And
            # nothing a new file says could matter to a daemon on its way out.
            logger.info(
                "reload skipped: the daemon is stopping", extra={"event": "config.reload_skipped"}
            )
            continue
        notifier.send("RELOADING=1", "STATUS=reloading the configuration")
        try:
            new = await asyncio.to_thread(load, path)
            summary = apply(rt, new, threads, http, path=path)
        except (ConfigError, TokenFileError) as exc:
            logger.error(
                "reload refused, the running configuration stays: %s",
                exc,
                extra={"event": "config.reload_refused"},
            )
            notifier.send("READY=1", "STATUS=reload refused: the configuration is invalid")
            continue
        except Exception:  # a bug in applying it: the daemon and its running tasks go on
            logger.exception(
                "reload failed part way; what it applied before the error stays",
                extra={"event": "config.reload_failed"},
            )
            notifier.send("READY=1", "STATUS=reload failed; see the log")
            continue
        logger.info("configuration reloaded: %s", summary, extra={"event": "config.reloaded"})
        notifier.send("READY=1", f"STATUS=reloaded: {summary}")


def apply(
    rt: Runtime,
    new: Config,
    threads: ThreadPoolExecutor,
    http: HttpClient,
    *,
    path: str = "<config>",
) -> str:
    """Make `new` (read from `path`) the running configuration; returns a one-line summary
    of the changes. Raises `ConfigError` or `TokenFileError`, having changed nothing, for
    a configuration that cannot apply."""
    old = rt.config
    changes: list[str] = []
    tokens = load_tokens(new.auth)  # may raise: before anything changes
    _check_listening(rt, new, tokens, path)
    added = sorted(set(new.types) - set(old.types))
    removed = sorted(set(old.types) - set(new.types))
    changed = sorted(n for n in set(new.types) & set(old.types) if new.types[n] != old.types[n])
    if added or removed or changed:
        built = build_types(new, threads, http)
        rt.types.clear()
        rt.types.update(built)  # the workers share this dict
        for word, names in (("added", added), ("changed", changed), ("removed", removed)):
            if names:
                changes.append(f"types {word}: {', '.join(names)}")
    if new.log != old.log:
        logs.set_level(new.log.level)
        changes.append(f"log level {new.log.level}")
    if new.queues != old.queues or new.types != old.types:
        rt.workers.flow.configure(*queue_settings(new))
        if new.queues != old.queues:
            changes.append("queues")
    if new.schedules != old.schedules:
        changes.append("schedules")
    if new.workers != old.workers:
        rt.workers.resize(new.workers)
        changes.append(
            f"workers: concurrency {new.workers.concurrency}, max_pending "
            f"{new.workers.max_pending}, grace {new.workers.grace_period:g}s"
        )
    # The token files are read again whether or not [auth] changed: rotating a token means
    # editing the file, then SIGHUP.
    if new.auth != old.auth or tokens != rt.auth.tokens:
        rt.auth.tokens = tokens
        rt.auth.open_paths = frozenset(new.auth.open)
        changes.append(f"auth: {len(tokens)} tokens")
        if ended := rt.events.end_unauthorized():
            changes.append(f"{ended} event streams ended: their callers are no longer let in")
    for section in ("server", "store"):
        if getattr(new, section) != getattr(old, section):
            changes.append(f"[{section}] changed: takes effect at the next restart")
    rt.config = msgspec.structs.replace(new, server=old.server, store=old.store)
    rt.schedules_changed.set()
    return "; ".join(changes) or "nothing changed"


def _check_listening(rt: Runtime, new: Config, tokens: list[Token], path: str) -> None:
    """Raise `ConfigError` if `new` leaves no token (and does not say `allow_anonymous`)
    while a socket the daemon listens on is neither loopback nor unix."""
    if tokens or new.auth.allow_anonymous:
        return
    public = [where for where in rt.listening if not is_loopback(where)]
    if public:
        names = ", ".join(f"{w[0]}:{w[1]}" if isinstance(w, tuple) else w for w in public)
        raise ConfigError(
            path,
            [
                f"no tokens (auth.tokens_file or auth.credential) while listening on {names}, "
                f"not loopback: a reload does not turn authentication off there; set "
                f"auth.allow_anonymous = true if that is meant"
            ],
        )
