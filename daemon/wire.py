"""The JSON of the HTTP API: request and response types, and decoding errors turned into
our error types with the offending field named."""

from __future__ import annotations

import datetime as dt
import functools
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec

from daemon.errors import BadRequest, Invalid
from daemon.models import Name, Task

T = TypeVar("T")


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    payload: msgspec.Raw = msgspec.Raw(b"{}")
    queue: Name | None = None
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    delay: Annotated[float, msgspec.Meta(ge=0, le=366 * 86400)] | None = None
    run_at: dt.datetime | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    callback: Name | None = None


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tasks: list[SubmitRequest]


_YEAR_10000 = 253402300800  # 10000-01-01T00:00:00Z: strftime writes years up to 9999


class AttemptView(msgspec.Struct, frozen=True):
    attempt: int
    started_at: str | None
    duration: float
    error: str


class CallbackView(msgspec.Struct, frozen=True):
    name: str
    state: str
    attempts: int
    last_error: str | None


class TaskView(msgspec.Struct, frozen=True):
    id: str
    type: str
    queue: str
    state: str
    payload: msgspec.Raw
    attempts: int
    max_attempts: int
    priority: int
    timeout: float
    run_at: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    result: msgspec.Raw | None
    last_error: str | None
    history: list[AttemptView]
    callback: CallbackView | None


class TaskPage(msgspec.Struct, frozen=True):
    tasks: list[TaskView]
    next_cursor: str | None


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


def rfc3339(t: float | None) -> str | None:
    """`t` (Unix seconds) as RFC 3339 UTC with milliseconds: 2026-11-22T06:21:11.088Z."""
    if t is None:
        return None
    # Keyed by the millisecond, not the float: under load a few submissions share each
    # one, and a task's created_at and run_at are different floats of the same moment.
    ms = int(t * 1000)
    text = _written.get(ms)
    if text is None:
        seconds, millis = divmod(ms, 1000)
        if not 0 <= seconds < _YEAR_10000:  # rare: written from t itself, not cached
            moment = dt.datetime.fromtimestamp(t, dt.UTC)
            return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if len(_written) >= _WRITTEN:
            _written.clear()
        # Two cached pieces joined: the format spec for the milliseconds and a call more
        # took 0.8 of the 2.3 µs a new instant cost.
        text = _written[ms] = _second(seconds) + _MILLIS[millis]
    return text


_WRITTEN = 1024
_written: dict[int, str] = {}
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    """The date and time of a whole second: most timestamps of a moment share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def view(task: Task) -> TaskView:
    # Positional, in TaskView's order: keyword arguments made a view take three times as long.
    return TaskView(
        task.id,
        task.type,
        task.queue,
        task.state,  # a StrEnum: encoded as its value, without the enum lookup
        msgspec.Raw(task.payload),
        task.attempts,
        task.max_attempts,
        task.priority,
        task.timeout,
        rfc3339(task.run_at),
        rfc3339(task.created_at),
        rfc3339(task.started_at),
        rfc3339(task.finished_at),
        None if task.result is None else msgspec.Raw(task.result),
        task.last_error,
        [
            AttemptView(a.attempt, rfc3339(a.started_at), round(a.duration, 6), a.error)
            for a in task.history
        ]
        if task.history
        else [],
        None
        if task.callback is None
        else CallbackView(
            task.callback,
            task.callback_state or "pending",
            task.callback_attempts,
            task.callback_error,
        ),
    )


_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD_NAMED = re.compile(r"(?:missing required|unknown) field `([^`]*)`")


def encode(value: object) -> bytes:
    return _encoder.encode(value)


def decode_body(body: bytes, tp: type[T], *, prefix: str = "") -> T:
    """Decode JSON `body` as `tp`: `BadRequest` if it is not JSON, `Invalid` naming the field
    if it is JSON that does not fit."""
    decoder = _decoders.get(tp)
    if decoder is None:
        decoder = _decoders[tp] = msgspec.json.Decoder(tp)
    try:
        # msgspec checks UTF-8 only where it decodes strings, not inside a skipped `Raw`.
        body.decode("utf-8")
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise invalid(exc, prefix=prefix) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise BadRequest("the body is not valid UTF-8") from None
    except RecursionError:
        raise BadRequest("the JSON is nested too deeply") from None


def invalid(exc: msgspec.ValidationError, *, prefix: str = "") -> Invalid:
    """An `Invalid` whose field is the dotted path msgspec reported, under `prefix`."""
    message = str(exc)
    path = ""
    if (m := _AT_PATH.search(message)) is not None:
        # msgspec writes an untyped mapping's key as "[...]": name the path up to it.
        path = m.group(1).split("[...]")[0].rstrip(".")
        message = message[: m.start()]
    if (m := _FIELD_NAMED.search(message)) is not None:
        path = f"{path}.{m.group(1)}" if path else m.group(1)
    field = ".".join(p for p in (prefix, path) if p) or None
    return Invalid(message, field=field)


def only_params(query: Mapping[str, str], known: set[str]) -> None:
    """Refuse a query parameter the route does not know (422 naming it)."""
    unknown = set(query) - known
    if unknown:
        name = sorted(unknown)[0]
        raise Invalid(f"unknown query parameter {name!r}", field=name)
