"""The errors of the Python client (daemon/client.py re-exports them) and how an answer
becomes one: `ClientError` for an answer that is not 2xx or does not decode, `Unreachable`
for no answer at all, built from the contract's error body, a probe's status or whatever
text came back. It is apart from the client because it depends only on the bytes and
headers of an answer, never on the session: the client's requests stay readable as
requests, and the mapping of answers to errors can be read (and changed) in one place.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from daemon.client_types import Health

__all__ = ["ClientError", "Unreachable", "answer_error", "decode_answer"]

T = TypeVar("T")


class _ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    field: str | None = None


class _ErrorResponse(msgspec.Struct, frozen=True):
    error: _ErrorBody


class ClientError(Exception):
    """The server answered with a status that is not 2xx (or, as `Unreachable`, not at all).

    `code` and `message` are the server's (`invalid`, `not_found`, `conflict`,
    `queue_full`, `draining`, `unauthorized`, ...), `field` names the offending field or
    parameter when there is one, and `retry_after` is the `Retry-After` of a 503 in seconds.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, field, retry_after)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its fields (pickle, copy, multiprocessing): `args` is not `__init__`'s.
        return (_rebuild, (type(self), self.__dict__.copy()))

    def __str__(self) -> str:
        text = f"{self.message} ({self.code}"
        if self.field:
            text += f", field {self.field}"
        if self.retry_after is not None:
            text += f", retry after {self.retry_after:g}s"
        return text + ")"


class Unreachable(ClientError):
    """No answer: the connection failed or the request timed out."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


def _rebuild(cls: type[ClientError], fields: dict[str, object]) -> ClientError:
    error = cls.__new__(cls)
    Exception.__init__(
        error,
        fields["status"],
        fields["code"],
        fields["message"],
        fields["field"],
        fields["retry_after"],
    )
    error.__dict__.update(fields)
    return error


def decode_answer(body: bytes, tp: type[T], status: int = 200) -> T:
    try:
        return msgspec.json.decode(body, type=tp)
    except msgspec.DecodeError as exc:
        raise ClientError(
            status, "bad_answer", f"the server's answer does not fit: {exc}"
        ) from None


def answer_error(
    status: int, reason: str | None, headers: Mapping[str, str], body: bytes
) -> ClientError:
    """The `ClientError` of a non-2xx answer: the contract's error body when there is one,
    else what the answer says (a /readyz status, a proxy's page)."""
    retry_after = _retry_after(headers.get("Retry-After"))
    try:
        error = msgspec.json.decode(body, type=_ErrorResponse).error
    except msgspec.DecodeError:
        pass
    else:
        return ClientError(
            status, error.code, error.message, field=error.field, retry_after=retry_after
        )
    try:
        health = msgspec.json.decode(body, type=Health)
    except msgspec.DecodeError:
        text = body.decode(errors="replace").strip()[:200]
        return ClientError(
            status, "http_error", text or reason or f"HTTP {status}", retry_after=retry_after
        )
    return ClientError(
        status, health.status, f"offload is {health.status}", retry_after=retry_after
    )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date (offload never sends one; a proxy in front of it may)
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
