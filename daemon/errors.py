"""Every error offload raises on purpose, as types.

The route wrapper (`routing.py`) maps `OffloadError` subclasses to a status and the JSON
error body of the contract; only the entry point turns a `ConfigError` into an exit code.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base of every deliberate error. `status` and `code` shape the HTTP answer."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(OffloadError):
    """The body is not JSON we can read at all."""

    status = 400
    code = "bad_request"


class Unauthorized(OffloadError):
    status = 401
    code = "unauthorized"


class Forbidden(OffloadError):
    status = 403
    code = "forbidden"


class NotFound(OffloadError):
    status = 404
    code = "not_found"


class MethodNotAllowed(OffloadError):
    """The path is served, but not with this method; `allow` lists those it is."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow


class RequestTimeout(OffloadError):
    """The request's body did not arrive within `server.body_timeout`. The route wrapper
    closes the connection after the answer: the rest of the body is never read."""

    status = 408
    code = "request_timeout"


class Conflict(OffloadError):
    """The task is not in a state that allows the operation."""

    status = 409
    code = "conflict"


class PayloadTooLarge(OffloadError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(OffloadError):
    status = 415
    code = "unsupported_media_type"


class Invalid(OffloadError):
    """Well-formed JSON whose content breaks a rule; `field` names the path."""

    status = 422
    code = "invalid"


class IdempotencyKeyReused(Invalid):
    """The Idempotency-Key was used within its window for a different request body
    (422, as the IETF httpapi idempotency-key draft says)."""

    code = "idempotency_key_reused"


class Unavailable(OffloadError):
    """We cannot take the work now; the client should come back after `retry_after` s."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class QueueFull(Unavailable):
    """`workers.max_pending` unfinished tasks already exist. Admission replaces the
    store's placeholder `retry_after` with an estimate from the completion rate."""

    def __init__(self, message: str, *, pending: int, needed: int) -> None:
        super().__init__(message, retry_after=1, code="queue_full")
        self.pending = pending
        self.needed = needed


class StoreUnavailable(Unavailable):
    """The store cannot be reached or written; nothing was acknowledged."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after, code="store_unavailable")


class StoreLocked(OffloadError):
    """Another daemon already serves this store."""


class ConfigError(OffloadError):
    """The configuration is wrong; `problems` lists every one found, each naming its key."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems
