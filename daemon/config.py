"""The configuration: strict, frozen structs loaded once from TOML.

`load()` reports every problem it finds at once, each naming the dotted key, the bad value and
what was expected, as one `ConfigError`. Nothing else in the daemon reads TOML.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from daemon.errors import ConfigError
from daemon.executors.command import SYSEXITS
from daemon.models import Name
from daemon.validation import (
    Duration,
    Period,
    Size,
    dec_hook,
    parse_duration,
    parse_size,
)
from daemon.validation import problems as walk

# Part of this module's API.
__all__ = ["Duration", "Period", "Size", "parse_duration", "parse_size"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


Positive = Annotated[int, msgspec.Meta(ge=1)]
DEFAULT_RETENTION = Duration(7 * 86400)


class ServerConfig(_Section, frozen=True):
    listen: str = "127.0.0.1:8080"
    max_body: Size = Size(1024 * 1024)
    max_wait: Duration = Duration(60)
    # How long an Idempotency-Key is remembered (IETF httpapi idempotency-key draft).
    idempotency_window: Duration = Duration(86400)
    # A comment line this often keeps idle GET /v1/events streams open through proxies.
    sse_heartbeat: Period = Period(15)
    # Most GET /v1/events streams open at once; one more is answered 503 with Retry-After.
    max_streams: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    # Most tasks in one POST /v1/tasks/batch.
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    # Most client connections open at once (and at most half the descriptor limit): one
    # more is closed at once, so that task processes and the store keep their descriptors.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    # A request's line and headers must arrive within this, counted from the connection's
    # start or from the first byte of a later request; else the connection is closed.
    header_timeout: Period = Period(20)
    # A request's whole body (as sent, before inflating) must arrive within this, counted
    # from when its headers arrived; else 408 and the connection is closed.
    body_timeout: Period = Period(20)


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
    queue: Name = "default"
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

    name: Name
    cron: str
    type: str
    timezone: str = "UTC"
    payload: Any = msgspec.field(default_factory=dict)
    queue: Name | None = None
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
    queues: dict[Name, QueueConfig | bool] = msgspec.field(default_factory=dict)
    schedules: list[ScheduleConfig] = msgspec.field(default_factory=list)
    callbacks: dict[Name, CallbackConfig] = msgspec.field(default_factory=dict)
    types: dict[Name, TypeConfig] = msgspec.field(default_factory=dict)


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
    gets its meaning checked too, so one problem never hides another (config_checks.py)."""
    from daemon.config_checks import semantic_problems  # it imports this module's structs

    queues = raw.get("queues")
    tables = raw
    if isinstance(queues, dict):  # its plain values are config_checks' to report
        tables = {**raw, "queues": {k: v for k, v in queues.items() if isinstance(v, dict)}}
    problems = walk(tables, Config, "")
    problems += semantic_problems(raw)
    if problems:
        raise ConfigError(source, problems)
    return msgspec.convert(raw, Config, dec_hook=dec_hook)
