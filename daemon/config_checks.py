"""What the configuration means, checked once its structure is sound (config.py walks the
structure): rules that span keys, and names that must resolve now rather than at run time
(handlers, programs, files, the store's URL, cron dates). Each part whose structure is
sound gets these checks even when a neighbour is wrong, so one problem never hides another.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from daemon import redact
from daemon.config import (
    AuthConfig,
    BackoffConfig,
    CallbackConfig,
    CommandType,
    HttpType,
    PythonType,
    ScheduleConfig,
    ServerConfig,
    StoreConfig,
    TypeConfig,
    WorkersConfig,
)
from daemon.executors.command import RESERVED_PREFIX, base_environment, find_program
from daemon.executors.http import check_url, read_secret
from daemon.executors.python import HandlerError, resolve_handler
from daemon.validation import dec_hook, show
from daemon.validation import problems as walk

T = TypeVar("T")


def _part(raw: dict[str, Any], key: str, tp: type[T]) -> T | None:
    """`raw[key]` as a `tp` (see `_lenient`)."""
    part: T | None = _lenient(raw.get(key, {}), tp, key)
    return part


def _lenient(item: object, tp: Any, path: str) -> Any:
    """`item` as a `tp`, without the keys the structural walk finds wrong (reported already)
    if need be, so that what is right in it still gets its meaning checked; None if even
    that does not convert."""
    try:
        return msgspec.convert(item, tp, dec_hook=dec_hook)
    except msgspec.ValidationError:
        if not isinstance(item, dict):
            return None
    prefix = f"{path}." if path else ""
    bad = {
        problem.removeprefix(prefix).split(" ", 1)[0].split(".", 1)[0].split("[", 1)[0].rstrip(":")
        for problem in walk(item, tp, path)
    }
    try:
        return msgspec.convert(
            {k: v for k, v in item.items() if k not in bad}, tp, dec_hook=dec_hook
        )
    except msgspec.ValidationError:
        return None


def semantic_problems(raw: dict[str, Any]) -> list[str]:
    """Rules that span keys, and names (handlers, programs, files) that must resolve now
    rather than at run time."""
    problems = _store_problems(_part(raw, "store", StoreConfig))
    workers = _part(raw, "workers", WorkersConfig)
    if workers is not None and workers.max_pending < workers.concurrency:
        problems.append(
            f"workers.max_pending = {workers.max_pending}: expected at least "
            f"workers.concurrency ({workers.concurrency})"
        )
    problems += _listen_problems(raw.get("server"), _part(raw, "auth", AuthConfig))
    problems += _queue_problems(raw.get("queues"))
    problems += _callback_problems(raw.get("callbacks"))
    problems += _schedule_problems(raw)
    types = raw.get("types")
    for name, item in (types if isinstance(types, dict) else {}).items():
        tc = _lenient(item, TypeConfig, f"types.{name}")
        if tc is not None:
            problems += _type_problems(str(name), tc)
    return problems


def _store_problems(store: StoreConfig | None) -> list[str]:
    """What `open_store` would refuse in `store.url`, found now (shown without a password)."""
    if store is None:
        return []
    scheme, colon, _ = store.url.partition(":")
    shown = f"store.url = {redact.url(store.url)!r}" if colon else "store.url"
    if scheme == "sqlite":
        from daemon.store.sqlite_file import database_path

        try:
            database_path(store.url)
        except ValueError as exc:
            return [f"{shown}: {exc}"]
        return []
    if scheme in ("postgresql", "postgres"):
        if not store.url.startswith(f"{scheme}://"):
            return [f"{shown}: expected {scheme}://USER@HOST[:PORT]/DATABASE"]
        try:
            urllib.parse.urlsplit(store.url).port  # noqa: B018 (it raises if not a number)
        except ValueError:
            return [f"{shown}: the port is not a number from 0 to 65535"]
        return []
    return [f"{shown}: expected sqlite:PATH, sqlite:///ABSOLUTE/PATH or postgresql://..."]


def _callback_problems(callbacks: object) -> list[str]:
    if not isinstance(callbacks, dict):
        return []
    problems = []
    for name, item in callbacks.items():
        cb = _lenient(item, CallbackConfig, f"callbacks.{name}")
        if cb is None:
            continue
        if (why := check_url(cb.url)) is not None:
            problems.append(f"callbacks.{name}.url = {redact.url(cb.url)!r}: {why}")
        problems += _backoff_problems(f"callbacks.{name}", cb.backoff)
        if cb.secret_file is not None:
            try:
                read_secret(cb.secret_file)
            except (OSError, ValueError) as exc:
                problems.append(f"callbacks.{name}.secret_file = {cb.secret_file!r}: {exc}")
    return problems


def _queue_problems(queues: object) -> list[str]:
    if not isinstance(queues, dict):
        return []
    problems = []
    for name, value in queues.items():
        if name == "strict":
            if not isinstance(value, bool):
                problems.append(f"queues.strict = {show(value)}: expected true or false")
        elif not isinstance(value, dict):
            problems.append(f"queues.{name} = {show(value)}: expected a [queues.{name}] table")
    return problems


def _schedule_problems(raw: dict[str, Any]) -> list[str]:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from croniter import croniter

    schedules, types = raw.get("schedules"), raw.get("types")
    if not isinstance(schedules, list):
        return []
    problems, names = [], set()
    for i, item in enumerate(schedules):
        path = f"schedules[{i}]"
        schedule = _lenient(item, ScheduleConfig, path)
        if schedule is None:
            continue
        if schedule.name in names:
            problems.append(f"{path}.name = {schedule.name!r}: used by another schedule")
        names.add(schedule.name)
        if len(schedule.cron.split()) != 5 or not croniter.is_valid(schedule.cron):
            problems.append(
                f"{path}.cron = {schedule.cron!r}: expected a cron expression of 5 fields "
                f"(minute hour day-of-month month day-of-week)"
            )
        elif not _fires(schedule.cron):
            problems.append(f"{path}.cron = {schedule.cron!r}: never fires (no such date)")
        try:
            ZoneInfo(schedule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{path}.timezone = {schedule.timezone!r}: not a known time zone")
        if not _finite(schedule.payload):
            problems.append(f"{path}.payload: holds inf or nan, which JSON cannot carry")
        if not isinstance(types, dict) or schedule.type not in types:
            problems.append(f"{path}.type = {schedule.type!r}: not a [types.NAME] of this file")
    return problems


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _fires(cron: str) -> bool:
    """Whether a valid expression names a date that exists ("0 0 31 4 *" does not): croniter
    gives up on such a search with an error, which the scheduler must never meet."""
    from croniter import croniter

    now = time.time()
    try:
        croniter(cron, now).get_next(float)
        croniter(cron, now).get_prev(float)
    except Exception:  # CroniterBadDateError, and whatever else a search may raise
        return False
    return True


def _handler_problems(key: str, handler: str) -> list[str]:
    try:
        resolve_handler(handler)
    except HandlerError as exc:
        return [f"{key} = {handler!r}: {exc}"]
    return []


def _type_problems(name: str, tc: TypeConfig) -> list[str]:
    problems = []
    if isinstance(tc, PythonType):
        problems += _handler_problems(f"types.{name}.handler", tc.handler)
    elif isinstance(tc, CommandType):
        problems += _command_problems(f"types.{name}", tc)
    elif isinstance(tc, HttpType):
        problems += _http_problems(f"types.{name}", tc)
    problems += _backoff_problems(f"types.{name}", tc.backoff)
    return problems


def _backoff_problems(path: str, backoff: BackoffConfig) -> list[str]:
    if backoff.max < backoff.initial:
        return [
            f"{path}.backoff.max = {backoff.max:g}s: expected at least "
            f"backoff.initial ({backoff.initial:g}s)"
        ]
    return []


def _listen_problems(server: object, auth: AuthConfig | None) -> list[str]:
    """`server.listen`, the token sources, and the rule between them: a non-loopback
    address needs tokens. Each is checked even when the other (or the rest of its table)
    is wrong."""
    from daemon.auth import TokenFileError, load_tokens
    from daemon.http_server import is_loopback, parse_listen

    problems = []
    listen = server.get("listen", ServerConfig.listen) if isinstance(server, dict) else None
    where = None
    if isinstance(listen, str):
        try:
            where = parse_listen(listen)
        except ValueError as exc:
            problems.append(f"server.listen = {listen!r}: {exc}")
        if isinstance(where, str) and not Path(where).parent.is_dir():
            problems.append(f"server.listen = {listen!r}: no directory {Path(where).parent}")
    tokens = None
    if auth is not None:
        try:
            tokens = load_tokens(auth, warn_lax=False)  # the daemon warns, once
        except TokenFileError as exc:
            problems.append(f"{exc.key}: {exc}")
    anonymous = auth is not None and tokens == [] and not auth.allow_anonymous
    if anonymous and where is not None and not is_loopback(where):
        problems.append(
            f"server.listen = {listen!r}: a non-loopback address needs tokens "
            f"(auth.tokens_file or auth.credential), or auth.allow_anonymous = true"
        )
    return problems


def _command_problems(path: str, tc: CommandType) -> list[str]:
    problems = []
    for key in tc.env:
        if key.startswith(RESERVED_PREFIX):
            problems.append(f"{path}.env.{key}: names starting {RESERVED_PREFIX} are offload's own")
    if tc.cwd is not None and not Path(tc.cwd).is_dir():
        problems.append(f"{path}.cwd = {tc.cwd!r}: not a directory")
    search = tc.env.get("PATH", base_environment()["PATH"])
    if find_program(tc.argv[0], path=search, cwd=tc.cwd) is None:
        why = "not an executable file" if "/" in tc.argv[0] else f"not found on PATH {search}"
        problems.append(f"{path}.argv[0] = {tc.argv[0]!r}: {why}")
    return problems


def _http_problems(path: str, tc: HttpType) -> list[str]:
    problems = []
    if (why := check_url(tc.url)) is not None:
        problems.append(f"{path}.url = {redact.url(tc.url)!r}: {why}")
    if tc.secret_file is not None:
        try:
            read_secret(tc.secret_file)
        except OSError as exc:
            problems.append(
                f"{path}.secret_file = {tc.secret_file!r}: cannot read: {exc.strerror or exc}"
            )
        except ValueError as exc:
            problems.append(f"{path}.secret_file = {tc.secret_file!r}: {exc}")
    return problems
