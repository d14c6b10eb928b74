"""The configuration: strict, frozen structs loaded once from TOML.

`load()` reports every problem it finds at once, each naming the dotted key, the bad value and
what was expected, as one `ConfigError`. Nothing else in the daemon reads TOML.
"""

from __future__ import annotations

import math
import time
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from daemon import redact
from daemon.errors import ConfigError
from daemon.executors.command import (
    RESERVED_PREFIX,
    SYSEXITS,
    base_environment,
    find_program,
)
from daemon.executors.http import check_url, read_secret
from daemon.executors.python import HandlerError, resolve_handler
from daemon.validation import (
    Duration,
    Period,
    Size,
    dec_hook,
    parse_duration,
    parse_size,
    show,
)
from daemon.validation import problems as walk

# Part of this module's API.
__all__ = ["Duration", "Period", "Size", "parse_duration", "parse_size"]

T = TypeVar("T")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


Positive = Annotated[int, msgspec.Meta(ge=1)]
DEFAULT_RETENTION = Duration(7 * 86400)
QueueName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class ServerConfig(_Section, frozen=True):
    listen: str = "127.0.0.1:8080"
    max_body: Size = Size(1024 * 1024)
    max_wait: Duration = Duration(60)
    # How long an Idempotency-Key is remembered (IETF httpapi idempotency-key draft).
    idempotency_window: Duration = Duration(86400)
    # A comment line this often keeps idle GET /v1/events streams open through proxies.
    sse_heartbeat: Period = Period(15)
    # Most tasks in one POST /v1/tasks/batch.
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000


class StoreConfig(_Section, frozen=True):
    url: str = "sqlite:var/offload.db"
    # SQLite only: "full" fsyncs every group commit, "normal" survives a crash, not power loss.
    synchronous: Literal["normal", "full"] = "full"
    # PostgreSQL only: connections this daemon opens (plus one for LISTEN/NOTIFY).
    pool_size: Annotated[int, msgspec.Meta(ge=2, le=100)] = 10


class WorkersConfig(_Section, frozen=True):
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    max_pending: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    grace_period: Duration = Duration(30)
    lease: Period = Period(60)
    prefetch: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0


class BackoffConfig(_Section, frozen=True):
    initial: Duration = Duration(1)
    max: Duration = Duration(300)
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.1


class _TypeBase(_Section, frozen=True, tag_field="kind", kw_only=True):
    queue: QueueName = "default"
    timeout: Period = Period(300)
    max_attempts: Positive = 3
    max_result: Size = Size(64 * 1024)
    # At most this many of the type run at once (under workers.concurrency); 0: no own cap.
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # Finished tasks of the type are deleted this long after they end.
    retention: Duration = DEFAULT_RETENTION
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)


class PythonType(_TypeBase, frozen=True, tag="python", kw_only=True):
    """Calls `handler` ("package.module:function"), resolved when the config is loaded."""

    handler: str


NoNul = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ExitCode = Annotated[int, msgspec.Meta(ge=1, le=255)]


class CommandType(_TypeBase, frozen=True, tag="command", kw_only=True):
    """Runs `argv` (exec, never a shell) with the payload as JSON on stdin; see
    daemon/executors/command.py. `argv[0]` is resolved when the config is loaded."""

    argv: Annotated[tuple[NoNul, ...], msgspec.Meta(min_length=1)]
    env: dict[EnvName, NoNul] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    max_output: Size = Size(64 * 1024)
    permanent_exit_codes: tuple[ExitCode, ...] = SYSEXITS
    kill_after: Duration = Duration(5)


class HttpType(_TypeBase, frozen=True, tag="http", kw_only=True):
    """POSTs the payload as JSON to `url`; see daemon/executors/http.py. `secret_file` is
    read when the config is loaded."""

    url: str
    secret_file: str | None = None
    connect_timeout: Period = Period(5)
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    max_response: Size = Size(64 * 1024)


TypeConfig = PythonType | CommandType | HttpType


class QueueConfig(_Section, frozen=True):
    """`[queues.NAME]`: how this queue shares the workers."""

    # Share of claims when several queues have due work (weighted fair selection).
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    # At most this many of the queue's tasks run at once; 0: no own cap.
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    # Tasks started per second at most (token bucket); 0: unlimited.
    rate: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Tokens the bucket holds: how many may start at once after a quiet spell; 0: max(1, rate).
    burst: Annotated[int, msgspec.Meta(ge=0)] = 0


class ScheduleConfig(_Section, frozen=True):
    """`[[schedules]]`: enqueue a task on a cron schedule, each fire exactly once."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    cron: str
    type: str
    timezone: str = "UTC"
    payload: Any = msgspec.field(default_factory=dict)
    queue: QueueName | None = None
    # "skip": fires missed while no daemon ran are skipped; "catch_up": one task makes up
    # for all of them, then the schedule goes on.
    misfire: Literal["skip", "catch_up"] = "skip"
    # A fire this late (a restart at the moment of the fire) still counts as on time.
    misfire_grace: Duration = Duration(60)


class CallbackConfig(_Section, frozen=True):
    """`[callbacks.NAME]`: where a task's final representation is POSTed when it ends, for
    tasks submitted with `"callback": "NAME"` (clients name a target, never a URL)."""

    url: str
    # HMAC-SHA256 key, read at load: X-Offload-Signature: t=<unix s>,v1=<hex>.
    secret_file: str | None = None
    timeout: Period = Period(10)
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)


class AuthConfig(_Section, frozen=True):
    tokens_file: str = ""
    credential: str = ""
    open: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")
    allow_anonymous: bool = False


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(_Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    # `strict = true` (always the first non-empty queue, in the order of weight) and
    # `[queues.NAME]` tables share this table.
    queues: dict[QueueName, QueueConfig | bool] = msgspec.field(default_factory=dict)
    schedules: list[ScheduleConfig] = msgspec.field(default_factory=list)
    callbacks: dict[QueueName, CallbackConfig] = msgspec.field(default_factory=dict)
    types: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], TypeConfig] = (
        msgspec.field(default_factory=dict)
    )


def queue_settings(config: Config) -> tuple[bool, dict[str, QueueConfig]]:
    """(strict, every known queue with its settings): the `[queues.NAME]` tables, plus the
    queues the task types name, with the defaults."""
    strict = config.queues.get("strict") is True
    queues = {n: q for n, q in config.queues.items() if isinstance(q, QueueConfig)}
    for tc in config.types.values():
        queues.setdefault(tc.queue, QueueConfig())
    for schedule in config.schedules:
        if schedule.queue is not None:
            queues.setdefault(schedule.queue, QueueConfig())
    return strict, queues


def load(path: str | Path) -> Config:
    """Read and validate `path`; raise `ConfigError` listing every problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no error
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from exc
    return parse(raw, source=str(path))


def parse(raw: dict[str, Any], *, source: str = "<config>") -> Config:
    """Validate in two passes, structure then meaning; each part whose structure is sound
    gets its meaning checked too, so one problem never hides another."""
    queues = raw.get("queues")
    tables = raw
    if isinstance(queues, dict):  # its plain values are `_queue_problems`' to report
        tables = {**raw, "queues": {k: v for k, v in queues.items() if isinstance(v, dict)}}
    problems = walk(tables, Config, "")
    problems += _semantic_problems(raw)
    if problems:
        raise ConfigError(source, problems)
    return msgspec.convert(raw, Config, dec_hook=dec_hook)


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


def _semantic_problems(raw: dict[str, Any]) -> list[str]:
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
            tokens = load_tokens(auth)
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
