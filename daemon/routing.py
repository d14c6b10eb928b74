"""The app's routes, each handler wrapped once when it is registered: the caller is
authorized (auth.py), errors become HTTP answers, and the answer is counted under its route.

`OffloadError` subclasses map to their status and the contract's JSON body; aiohttp's own
HTTP errors (a body over the limit) are reshaped the same way; anything else is a bug,
logged and answered 500 without details. A path nobody serves answers 404 and a method its
path does not serve 405 with `Allow`, through the same wrapper. A 408 (`RequestTimeout`:
a body slower than `server.body_timeout`) closes the connection after it. A client that
went away (`ConnectionError`) is not a bug: nothing is answered, and it is logged at debug.
A handler that streams marks its started response (`STREAM`): an error after that ends the
stream, since a second response cannot follow the first one's status line.

Before a handler runs, the caller is checked (auth.py: token, scope, and that no web page of
another origin sent it), then a POST or DELETE that carries a body must say it is JSON
(415 otherwise): a browser sends `text/plain` and form bodies to any origin without asking
first, `application/json` never.

This is not an aiohttp middleware: with one, every request passes through three coroutine
layers (aiohttp adds its own) and a route lookup for the metrics label, a tenth of what the
event loop spends on a submission beyond a bare handler.
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from daemon.answer import JsonAnswer
from daemon.auth import CALLER
from daemon.errors import (
    MethodNotAllowed,
    NotFound,
    OffloadError,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from daemon.runtime import Runtime
from daemon.wire import ErrorBody, ErrorResponse, encode

logger = logging.getLogger(__name__)

UNMATCHED = "unmatched"  # the metrics label of requests for paths nobody serves
_WITH_BODY = frozenset({hdrs.METH_POST, hdrs.METH_DELETE, hdrs.METH_PUT, hdrs.METH_PATCH})
STREAM = web.RequestKey("stream", web.StreamResponse)  # a response whose headers are sent

_AIOHTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def json_response(value: object, status: int = 200) -> JsonAnswer:
    return JsonAnswer(encode(value), status)


def error_response(status: int, code: str, message: str, field: str | None = None) -> JsonAnswer:
    return json_response(ErrorResponse(ErrorBody(code=code, message=message, field=field)), status)


def _offload_error(exc: OffloadError) -> JsonAnswer:
    response = error_response(exc.status, exc.code, exc.message, exc.field)
    if isinstance(exc, Unavailable):
        response.headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="offload"'
    elif isinstance(exc, MethodNotAllowed):
        response.headers["Allow"] = ",".join(exc.allow)
    elif isinstance(exc, RequestTimeout):
        # The rest of the body may still come: the connection cannot carry another request.
        response.force_close()
    return response


def _stream(request: web.Request) -> web.StreamResponse | None:
    stream: web.StreamResponse | None = request.get(STREAM)
    return stream


def _check_body_type(request: web.Request) -> None:
    """A POST or DELETE with a body says `Content-Type: application/json`."""
    if (
        request.method in _WITH_BODY
        and request.body_exists
        and request.content_type != "application/json"
    ):
        sent = request.headers.get("Content-Type") or "none"
        raise UnsupportedMediaType(
            f"send Content-Type: application/json (got {sent})", field="Content-Type"
        )


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Routes:
    """Registers the app's routes: `add()` each path with its handlers, then `close()`."""

    def __init__(self, app: web.Application, rt: Runtime) -> None:
        self.app = app
        self._rt = rt
        self._codes: dict[int, str] = {}  # status -> its label, made once

    def add(self, path: str, *, head: bool = True, **handlers: Handler) -> None:
        """Serve `path` (aiohttp's syntax) with one handler per method, given by name
        (`GET=...`); a GET also answers HEAD unless `head` is false (a stream has no end
        for HEAD to stop at). Any other method answers 405."""
        resource = self.app.router.add_resource(path)
        label = resource.canonical
        head = head and "GET" in handlers
        allow = sorted({*handlers, *(["HEAD"] if head else [])})
        for method, handler in handlers.items():
            wrapped = self._wrap(handler, label, served=True)
            resource.add_route(method, wrapped)
            if method == hdrs.METH_GET and head:
                resource.add_route(hdrs.METH_HEAD, wrapped)

        async def not_allowed(request: web.Request) -> web.StreamResponse:
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {label}; use {', '.join(allow)}",
                allow=allow,
            )

        resource.add_route(hdrs.METH_ANY, self._wrap(not_allowed, label))

    def close(self) -> None:
        """After the last `add()`: every other path answers 404."""

        async def not_found(request: web.Request) -> web.StreamResponse:
            raise NotFound(f"nothing is served at {request.path}")

        self.app.router.add_route(hdrs.METH_ANY, "/{path:.*}", self._wrap(not_found, UNMATCHED))

    def _wrap(self, handler: Handler, label: str, *, served: bool = False) -> Handler:
        """`handler` behind the checks; a `served` one (not a 404 or 405) also checks the
        type of a body."""
        authorize = self._rt.auth.authorize
        rt, codes = self._rt, self._codes

        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                request[CALLER] = authorize(request)
                if served:
                    _check_body_type(request)
                response = await handler(request)
            except OffloadError as exc:
                if (stream := _stream(request)) is not None:
                    return stream  # the handler told its client already, if it could
                response = _offload_error(exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = _AIOHTTP_CODES.get(exc.status, "http_error")
                response = error_response(exc.status, code, exc.reason)
            except Exception as exc:
                if isinstance(exc, ConnectionError) and _gone(request):
                    logger.debug(
                        "client went away during %s %s",
                        request.method,
                        request.path,
                        extra={"event": "http.client_gone"},
                    )
                    # aiohttp's writing of this answer meets the closed connection and stops.
                    return _stream(request) or web.Response(status=499)
                logger.exception(
                    "unhandled error on %s %s",
                    request.method,
                    request.path,
                    extra={"event": "http.bug"},
                )
                if (stream := _stream(request)) is not None:
                    return stream
                response = error_response(500, "internal", "internal error; see the daemon's log")
            status = response.status
            code = codes.get(status) or codes.setdefault(status, str(status))
            rt.metrics.http.add((label, code))
            return response

        return answer
