"""The answers of the OpenAPI document's operations (daemon/openapi_paths.py and
daemon/openapi_ops.py build the routes): the response objects, and one example error body
per status, encoded through the same types the route wrapper sends (`daemon.wire`) so the
document cannot drift from what is answered. It also holds the small vocabulary every part
of the document shares (`Json`, `REF`, `EXAMPLE_ID`). It is apart from the routes because
what a status looks like is one decision for all of them, whichever route answers it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.config import ServerConfig
from daemon.errors import (
    Conflict,
    Forbidden,
    NotFound,
    OffloadError,
    StoreUnavailable,
    Unauthorized,
)
from daemon.events import too_many_streams
from daemon.wire import ErrorBody, ErrorResponse, encode

Json = dict[str, Any]
REF = "#/components/schemas/{name}"
EXAMPLE_ID = "01JD8X3K5Q9W2M7P4R6T0V1Y3Z"


def error_example(error: type[OffloadError], message: str, field: str | None = None) -> Any:
    """The body the route wrapper sends for `error`, through the same types."""
    body = ErrorResponse(ErrorBody(code=error.code, message=message, field=field))
    return msgspec.json.decode(encode(body))


def raised_example(exc: OffloadError) -> Any:
    """The body the route wrapper sends for `exc`, made where the daemon makes it."""
    body = ErrorResponse(ErrorBody(code=exc.code, message=exc.message, field=exc.field))
    return msgspec.json.decode(encode(body))


_RETRY_AFTER: Json = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
_WWW_AUTHENTICATE: Json = {
    "description": 'Always `Bearer realm="offload"`.',
    "required": True,
    "schema": {"type": "string"},
}
UNAUTHORIZED = error_example(Unauthorized, "send Authorization: Bearer <token>", "Authorization")
_ERROR_TEXT = {
    "400": "The body is not JSON, not UTF-8, or nested too deeply (`bad_request`).",
    "401": "No token, or not a valid one (`unauthorized`).",
    "403": "The token lacks the scope; or a web page sent the request (an `Origin` not this "
    "server's, `Sec-Fetch-Site: cross-site`), or with no tokens a `Host` that is not "
    "localhost or an IP address (`forbidden`); `field` names the header.",
    "404": "No such task (`not_found`).",
    "408": "The body did not arrive within `server.body_timeout` of the headers "
    "(`request_timeout`); the connection is closed.",
    "409": "Not allowed in the task's state (`conflict`).",
    "413": "The body is over `server.max_body` (`too_large`).",
    "415": "The body is not `application/json` (`unsupported_media_type`).",
    "422": "A field or parameter is invalid, or the task type is unknown (`invalid`); "
    "`field` names it.",
    "503": "Cannot take it now (`queue_full`, `draining`, `store_unavailable`, "
    "`too_many_streams`); "
    "come back after `Retry-After` seconds.",
}


def json_response(description: str, schema: str, *, headers: Json | None = None) -> Json:
    response: Json = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name=schema)}}},
    }
    if headers:
        response["headers"] = headers
    return response


def error_response(status: str, example: Any) -> Json:
    response = json_response(_ERROR_TEXT[status], "ErrorResponse")
    response["content"]["application/json"]["example"] = example
    if status == "503":
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    elif status == "401":
        response["headers"] = {"WWW-Authenticate": _WWW_AUTHENTICATE}
    return response


def not_found_example() -> Any:
    return error_example(NotFound, f"no task {EXAMPLE_ID}", "id")


def conflict_example(what: str) -> Any:
    return error_example(Conflict, f"task {EXAMPLE_ID} {what}", "id")


def forbidden_example(scope: str) -> Any:
    return error_example(Forbidden, f"token 'billing' lacks the {scope!r} scope", "scope")


def store_example() -> Any:
    return error_example(StoreUnavailable, "the store could not be read: disk I/O error")


def too_many_streams_example() -> Any:
    """The refusal of an event stream past `server.max_streams` (at its default)."""
    return raised_example(too_many_streams(ServerConfig().max_streams))


def unavailable_example(code: str) -> Any:
    message = {
        "queue_full": "100000 tasks are unfinished (max_pending is 100000)",
        "draining": "offload is shutting down and takes no new tasks",
    }[code]
    return {"error": {"code": code, "message": message}}
