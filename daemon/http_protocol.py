"""aiohttp's connection protocol, with what aiohttp leaves to the client bounded:

- A request aiohttp cannot parse (a malformed request line or header, a header past its
  size limit, a bad Content-Length) is answered in the contract's JSON error shape, counted
  (route MALFORMED) and logged as one line at debug: aiohttp's own answer is plain text with
  an ERROR record and a traceback, so any broken client could fill the journal. Errors of
  aiohttp's own making (5xx) keep its handling.
- Request line and headers must arrive within `server.header_timeout` of the connection's
  start, or of the first byte of a later request; else 408 (if a request was begun) and the
  connection closes, counted as (MALFORMED, 408). Once headers arrived it no longer applies:
  long-polls and event streams are as long as they need. A body that did not come with its
  headers has `server.body_timeout` to arrive, timed where it is read (`body.read_json`).
- An idle keep-alive connection closes after `KEEPALIVE_TIMEOUT`, not aiohttp's hour.
- A handler that may wait long without writing (an event stream) can be told at once when
  its connection is lost (`on_lost`). aiohttp tells a handler only through a write that
  fails: it cancels handlers on disconnect only with `handler_cancellation`, which stays
  off, since a submission cancelled halfway through its commit is worse than one whose
  answer finds nobody.
- At most `server.max_connections` connections (and half the descriptor limit) are open;
  one more is closed at once, counted as (OVER_CAPACITY, 503), logged once per spell.
- Bodies are not inflated here (`auto_decompress=False`: `body.read_json` inflates, after
  auth, up to `server.max_body`), and the rest of a body still on its way when the answer
  went out is not read and thrown away (`lingering_time=0`): the connection closes instead.
  aiohttp would read on for ten seconds, inflating as it read, for a client refused before
  anything checked it. The cost: a client that sends its whole body before it reads may
  meet a reset rather than the 401 or 413 (curl and aiohttp read the early answer).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from daemon.config import ServerConfig
from daemon.errors import BadRequest
from daemon.metrics import Tally
from daemon.runtime import RUNTIME
from daemon.wire import ErrorBody, ErrorResponse, encode

logger = logging.getLogger(__name__)

MALFORMED = "malformed"  # the route label of requests that could not be parsed or came late
OVER_CAPACITY = "over_capacity"  # the route label of connections closed at the cap
# As nginx's keepalive_timeout: longer than a client's pool keeps a connection idle, short
# enough that idle connections do not pile up (aiohttp's default is 3630 s).
KEEPALIVE_TIMEOUT = 75.0
# What every connection's protocol gets on top of the runner's settings (see the docstring).
_PROTOCOL_SETTINGS: dict[str, Any] = {
    "keepalive_timeout": KEEPALIVE_TIMEOUT,
    "lingering_time": 0.0,
    "auto_decompress": False,
}


def _late_answer() -> bytes:
    """The 408 for a request whose line and headers did not arrive in time: written straight
    to the transport, since there is no request to answer through aiohttp."""
    body = encode(
        ErrorResponse(
            ErrorBody(
                code="request_timeout",
                message="the request line and headers did not arrive within server.header_timeout",
            )
        )
    )
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


LATE_ANSWER = _late_answer()


def _summary(message: str | None, exc: BaseException | None) -> str:
    """The first line of aiohttp's message ("Invalid method encountered:"), without the
    bytes it quotes: they are the client's, and may be anything."""
    text = message or (str(exc) if exc is not None else "") or "unreadable request"
    first = text.strip().splitlines()[0]
    return first.split(" b'", 1)[0].split(' b"', 1)[0].rstrip(": ")


@dataclass(frozen=True, slots=True)
class Limits:
    """What `server.*` settings the connections are held to."""

    max_connections: int
    header_timeout: float


def limits(config: ServerConfig) -> Limits:
    """`config`'s limits, with `max_connections` lowered to half the soft descriptor limit:
    the other half is for task processes, the store and the log."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = config.max_connections
    if soft != resource.RLIM_INFINITY and soft // 2 < cap:
        cap = max(1, soft // 2)
        logger.info(
            "server.max_connections = %d is over half the open-file limit (%d): lowered to %d",
            config.max_connections,
            soft,
            cap,
            extra={"event": "http.connections_lowered"},
        )
    return Limits(max_connections=cap, header_timeout=config.header_timeout)


class _Protocol(RequestHandler):
    __slots__ = ("_body", "_head_begun", "_head_since", "_on_lost", "counts")

    def __init__(self, manager: web.Server, *, counts: Tally, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.counts = counts
        # When the request line and headers now awaited began to be (None: none awaited, as
        # while a request is answered or the connection idles between requests). A sweep
        # of the server reads it (`_Server.sweep`): one timer for every connection, not a
        # timer made and cancelled per request on the submission path.
        self._head_since: float | None = None
        self._head_begun = False  # bytes of a request whose headers are not all in
        self._body: StreamReader | None = None  # of the last request whose headers came
        self._on_lost: Callable[[], None] | None = None  # see `on_lost()`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        if isinstance(server, _Server) and not server.admit():
            # Never registered: connection_lost has nothing to undo, no task is started.
            self._manager = None
            self._force_close = True
            transport.close()
            return
        super().connection_made(transport)
        self._head_since = self._loop.time()  # a connection that never speaks counts too
        if isinstance(server, _Server):
            server.watch()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_since = None
        self._body = None
        super().connection_lost(exc)
        if (on_lost := self._on_lost) is not None:
            self._on_lost = None
            on_lost()

    def data_received(self, data: bytes) -> None:
        # Bytes past the whole of the last request (its headers and its body) begin the
        # next one; the parser alone knows where that is, so the last body is kept to ask.
        body = self._body
        next_head = body is None or body.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._force_close:
            return  # closing (refused at the cap, or already answered for good)
        if self._request_count != count:
            # Its headers are in: the handler's time is not bounded here.
            self._body = self._messages[-1][1] if self._messages else None
            self._head_since = None
            self._head_begun = False
        elif data and next_head and not self._head_begun:
            self._head_begun = True
            if self._head_since is None:
                self._head_since = self._loop.time()

    def head_overdue(self, now: float, timeout: float) -> bool:
        since = self._head_since
        return since is not None and now - since >= timeout

    def head_expired(self, timeout: float) -> None:
        """Close the connection, its request line and headers late (408 if one was begun)."""
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._request_in_progress:
            # A partial request behind one still being answered (pipelined): it is due
            # once that one is done, as a request of its own would be.
            self._head_since = self._loop.time()
            return
        if self._head_begun:
            logger.debug(
                "request headers from %s not in within %gs: closing",
                self.peername,
                timeout,
                extra={"event": "http.header_timeout", "status": 408},
            )
            self.counts.add((MALFORMED, "408"))
            transport.write(LATE_ANSWER)  # sent before the close: close() flushes
        self._head_since = None
        self.force_close()

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


def on_lost(request: web.BaseRequest, callback: Callable[[], None] | None) -> None:
    """Have `callback` called once `request`'s connection is lost (at once if it is already),
    or no longer with None. Only a handler that asks pays for it; on a connection that is
    not ours (an app served by aiohttp's own protocol) it is never called."""
    protocol = request.protocol
    if not isinstance(protocol, _Protocol):
        return
    if callback is not None and protocol.transport is None:
        callback()
        return
    protocol._on_lost = callback


class _Server(web.Server):
    counts: Tally
    limits: Limits
    refused: int  # connections closed at the cap since one was last accepted
    sweeping: asyncio.TimerHandle | None  # the next look for late headers

    def __call__(self) -> RequestHandler:
        kwargs = {**self._kwargs, **_PROTOCOL_SETTINGS}
        return _Protocol(self, loop=self._loop, counts=self.counts, **kwargs)

    def watch(self) -> None:
        """Look for late headers every quarter of `server.header_timeout` while connections
        are open (so one is closed between 1 and 1.25 times it after its headers began)."""
        if self.sweeping is None:
            self.sweeping = self._loop.call_later(self.limits.header_timeout / 4, self.sweep)

    def sweep(self) -> None:
        self.sweeping = None
        timeout = self.limits.header_timeout
        now = self._loop.time()
        for conn in list(self._connections):
            if isinstance(conn, _Protocol) and conn.head_overdue(now, timeout):
                conn.head_expired(timeout)
        if self._connections:
            self.watch()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        if self.sweeping is not None:
            self.sweeping.cancel()
            self.sweeping = None
        await super().shutdown(timeout)

    def admit(self) -> bool:
        """Whether one more connection may open; counts and logs one that may not."""
        cap = self.limits.max_connections
        if len(self._connections) < cap:
            if self.refused:
                logger.info(
                    "accepting connections again; %d were closed at server.max_connections",
                    self.refused,
                    extra={"event": "http.connections_accepted"},
                )
                self.refused = 0
            return True
        if not self.refused:
            logger.warning(
                "%d connections are open (server.max_connections): closing new ones at once "
                "until some close",
                cap,
                extra={"event": "http.connections_full"},
            )
        self.refused += 1
        self.counts.add((OVER_CAPACITY, "503"))
        return False


class Runner(web.AppRunner):
    """An `AppRunner` whose connections are `_Protocol`s, held to the app's `server.*`
    limits, their refusals counted in `counts`."""

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
        rt = self.app.get(RUNTIME)
        server.limits = limits(rt.config.server if rt is not None else ServerConfig())
        server.refused = 0
        server.sweeping = None
        return server
