"""aiohttp's connection protocol, with one change: a request aiohttp cannot parse (a
malformed request line or header, a header past its size limit, a bad Content-Length) is
answered in the contract's JSON error shape, counted, and logged as one line at debug.

aiohttp answers those itself, before any route sees them: plain text, and an ERROR record
with a traceback for every one, so any broken or hostile client could fill the journal.
Errors of aiohttp's own making (5xx) keep its handling.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from daemon.errors import BadRequest
from daemon.metrics import Tally
from daemon.wire import ErrorBody, ErrorResponse, encode

logger = logging.getLogger(__name__)

MALFORMED = "malformed"  # the route label of requests that could not be parsed


def _summary(message: str | None, exc: BaseException | None) -> str:
    """The first line of aiohttp's message ("Invalid method encountered:"), without the
    bytes it quotes: they are the client's, and may be anything."""
    text = message or (str(exc) if exc is not None else "") or "unreadable request"
    first = text.strip().splitlines()[0]
    return first.split(" b'", 1)[0].split(' b"', 1)[0].rstrip(": ")


class _Protocol(RequestHandler):
    __slots__ = ("counts",)

    def __init__(self, manager: web.Server, *, counts: Tally, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.counts = counts

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        summary = _summary(message, exc)
        logger.debug(
            "malformed HTTP request from %s: %s",
            request.remote,
            summary,
            extra={"event": "http.malformed", "status": status},
        )
        self.counts.add((MALFORMED, str(status)))
        body = ErrorResponse(
            ErrorBody(code=BadRequest.code, message=f"malformed HTTP request: {summary}")
        )
        response = web.Response(status=status, body=encode(body), content_type="application/json")
        response.force_close()  # what follows on the connection cannot be trusted
        return response


class _Server(web.Server):
    counts: Tally

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, counts=self.counts, **self._kwargs)


class Runner(web.AppRunner):
    """An `AppRunner` whose connections answer unparseable requests as `_Protocol` does,
    counted in `counts` (route label MALFORMED)."""

    def __init__(self, app: web.Application, counts: Tally, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._counts = counts

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application builds a plain Server; it is made one whose protocol is ours
        # (same state, same class layout), rather than rebuilt from aiohttp's internals.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.counts = self._counts
        return server
