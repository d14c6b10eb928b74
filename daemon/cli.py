"""The `offload` command: `serve` runs the daemon, `check-config` validates a config file;
the client commands (`submit`, `status`, `cancel`, `retry`, `list`, `stats`, `queues`,
`schedules`, `pause`, `resume`) talk to a running daemon (daemon/client_cli.py, which
documents their exit codes).

Exit codes of serve and check-config: 0 done; 1 could not start (store locked or
unreachable, address in use); 70 a bug stopped the daemon (EX_SOFTWARE); 78 the
configuration is wrong (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from daemon import __version__, client_cli, logs
from daemon.auth import lax_note
from daemon.config import load
from daemon.errors import ConfigError, OffloadError
from daemon.lifecycle import HANDLER_THREAD
from daemon.lifecycle import serve as run

logger = logging.getLogger("daemon")

EX_OK, EX_START, EX_SOFTWARE, EX_CONFIG = 0, 1, 70, 78
THREADS_GRACE = 1.0  # seconds the pool's idle threads get to end before the exit
DEFAULT_CONFIG = "/etc/offload/offload.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload", description="A durable background-task daemon, and its client."
    )
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    default = os.environ.get("OFFLOAD_CONFIG", DEFAULT_CONFIG)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", default=default, help=f"config file (default {default})")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", default=default)
    client_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)
    if args.command == "check-config":
        return check_config(args.file)
    return serve(args.config)


def check_config(path: str) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        sys.stderr.write(f"{exc.path}: {len(exc.problems)} problem(s)\n")
        for problem in exc.problems:
            sys.stderr.write(f"  {problem}\n")
        return EX_CONFIG
    sys.stdout.write(f"{path}: ok ({len(config.types)} task types)\n")
    # Not a problem (the daemon starts), but this is where an operator looks: the daemon
    # itself logs it at each start and reload.
    if config.auth.tokens_file:
        note = lax_note("auth.tokens_file", Path(config.auth.tokens_file))
        if note is not None:
            sys.stderr.write(f"note: {note}\n")
    return EX_OK


def serve(path: str) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        logs.setup()
        logger.error("configuration error in %s", exc, extra={"event": "config.invalid"})
        return EX_CONFIG
    logs.setup(config.log.level, config.log.format)
    _tune_gc()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(config, config_path=path))
    except BaseException as exc:  # the one place errors become exit codes
        code = _exit_code(exc)
    else:
        code = EX_OK
    _leave_stuck_threads(code)
    return code


def _leave_stuck_threads(code: int) -> None:
    """Exit now if sync handlers that ignored their cancel still run: the interpreter would
    wait for their threads at exit (past systemd's stop timeout, into a SIGKILL). Their
    tasks were put back or recorded already."""
    # Idle pool threads end at once (the pool was shut down): give them a moment.
    deadline = time.monotonic() + THREADS_GRACE
    busy = []
    for thread in threading.enumerate():
        if thread.name.startswith(HANDLER_THREAD):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                busy.append(thread)
    if not busy:
        return
    logger.warning(
        "exiting without waiting for %d sync handlers that ignored their cancel",
        len(busy),
        extra={"event": "daemon.threads_left"},
    )
    logging.shutdown()  # what the interpreter's exit would flush
    os._exit(code)


# Each request and task allocates a few dozen containers that reference counting frees; the
# few that live on (those of requests in flight) are what the cycle collector keeps
# scanning. At Python's default threshold (700) it ran ~900 times in 8 s of ingest, 10 % of
# the event loop's time; at this one, a handful of times. Garbage cycles wait longer to be
# freed: at most this many allocations' worth.
GC_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Collect cycles less often, and never scan what was imported or built before serving
    (modules, the config): `gc.freeze()` moves it out of the collector's generations."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def _exit_code(exc: BaseException) -> int:
    # A start failure inside the TaskGroup (the bind, say) arrives wrapped in a group of one.
    leaf = exc
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, ConfigError):
        logger.error("configuration error: %s", leaf, extra={"event": "config.invalid"})
        return EX_CONFIG
    if isinstance(leaf, OffloadError | OSError):
        logger.error("cannot start: %s", leaf, extra={"event": "daemon.start_failed"})
        return EX_START
    logger.critical("offload stopped by a bug", exc_info=exc, extra={"event": "daemon.bug"})
    return EX_SOFTWARE
