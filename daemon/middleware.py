"""The one middleware: the caller is authorized (auth.py), and errors become HTTP answers:
`OffloadError` subclasses map to their status and the contract's JSON body; aiohttp's own
HTTP errors (404 route, 405, 413) are reshaped the same way; anything else is a bug, logged,
and answered 500 without details."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from daemon.auth import CALLER, Authenticator
from daemon.errors import OffloadError, Unauthorized, Unavailable
from daemon.runtime import RUNTIME
from daemon.wire import ErrorBody, ErrorResponse, encode

logger = logging.getLogger(__name__)

_AIOHTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    400: "bad_request",
}


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body = encode(ErrorResponse(ErrorBody(code=code, message=message, field=field)))
    return web.Response(status=status, body=body, content_type="application/json")


def middleware(authenticator: Authenticator) -> Middleware:
    """The one middleware (each layer costs every request a frame): the caller is
    authorized, the handler answers, errors take the contract's shape, and the answer is
    counted."""

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await _answer(request, handler, authenticator)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics = request.app[RUNTIME].metrics
        metrics.http.add((route, str(response.status)))
        return response

    return front


async def _answer(
    request: web.Request, handler: Handler, authenticator: Authenticator
) -> web.StreamResponse:
    try:
        request[CALLER] = authenticator.authorize(request)
        return await handler(request)
    except OffloadError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
        if isinstance(exc, Unavailable):
            response.headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="offload"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "http_error")
        response = error_response(exc.status, code, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        logger.exception(
            "unhandled error on %s %s",
            request.method,
            request.path,
            extra={"event": "http.bug"},
        )
        return error_response(500, "internal", "internal error; see the daemon's log")
