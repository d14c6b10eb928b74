"""`GET /v1/events`: task state changes as Server-Sent Events.

Each event is `id: <change sequence>`, `event: task`, `data: <the task>`. With
`Last-Event-ID` (header, or `last_event_id` in the query) the stream first replays, from the
store, every matching task changed since, once each in its current state, then goes live.
A comment line every `server.sse_heartbeat` keeps proxies from closing an idle stream.
An error once the stream has begun (the store failing during the replay, or the caller's
token revoked by a reload) comes as an `event: error` with the error's JSON body, and ends
the stream. A stream whose client takes nothing of a write for two heartbeats is reset: its
client is gone or stuck, and must not hold the daemon's memory. A stream whose client closes
the connection ends as soon as the daemon sees it close, not at its next write (a heartbeat
away): until it ends it holds one of `server.max_streams`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from daemon.answer import reset_connection
from daemon.errors import Forbidden, Invalid, OffloadError, Unauthorized
from daemon.events import Filter, Subscription
from daemon.http_protocol import on_lost
from daemon.ids import is_id
from daemon.models import SCAN_ROWS, Task
from daemon.routing import STREAM, Routes
from daemon.runtime import RUNTIME, Runtime
from daemon.wire import ErrorBody, ErrorResponse, encode, only_params, view

logger = logging.getLogger(__name__)

PAGE = 500
MAX_EVENT_ID = 2**63 - 1  # change numbers are 64-bit integers in both stores
STALL_HEARTBEATS = 2  # a write not taken within this many heartbeats ends the stream


def add_routes(routes: Routes) -> None:
    routes.add("/v1/events", head=False, GET=events)


def _filter(request: web.Request) -> Filter:
    q = request.query
    only_params(q, {"task_id", "type", "queue", "last_event_id"})
    task_id = q.get("task_id")
    if task_id is not None and not is_id(task_id):
        raise Invalid("task_id is not a task id", field="task_id")
    return Filter(task_id=task_id, type=q.get("type"), queue=q.get("queue"))


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id"))
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_EVENT_ID:
        raise Invalid("Last-Event-ID must be an id this server sent", field="Last-Event-ID")
    return int(raw)


class _Stalled(Exception):
    """The client took nothing of a write for `_Stream.stall` seconds."""


class _Gone(Exception):
    """The client closed the connection."""


class _Stream:
    """Writes to one event stream, each bounded by `stall` seconds; no task once the
    subscription is revoked or the connection lost."""

    def __init__(self, response: web.StreamResponse, sub: Subscription, stall: float) -> None:
        self.response = response
        self.sub = sub
        self.stall = stall
        self.gone = False

    def lost(self) -> None:
        """The connection is lost: wake the stream, which ends at its next `check()`."""
        self.gone = True
        self.sub.ready.set()

    def check(self) -> None:
        if self.gone:
            raise _Gone
        if self.sub.revoked:
            raise Unauthorized(
                "the token of this stream was revoked or lost its scope (reload)",
                field="Authorization",
            )

    async def write(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.stall):
                await self.response.write(data)
        except TimeoutError:
            raise _Stalled from None

    async def send(self, task: Task) -> None:
        self.check()
        data = encode(view(task)).decode()
        await self.write(f"id: {task.changed}\nevent: task\ndata: {data}\n\n".encode())


def _allowed(rt: Runtime, request: web.Request) -> Callable[[], bool]:
    """Whether `request`'s caller would still be let in, as the routes decide (asked again
    after a reload changed the tokens)."""

    def allowed() -> bool:
        try:
            rt.auth.authorize(request)
        except (Unauthorized, Forbidden):
            return False
        return True

    return allowed


async def events(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    wanted = _filter(request)
    last = _last_event_id(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    server = rt.config.server
    # Subscribe before replaying, so nothing that changes meanwhile is missed; what the
    # replay already sent is skipped by its change sequence.
    subscribing = rt.events.subscribe(
        wanted, limit=server.max_streams, allowed=_allowed(rt, request)
    )
    with subscribing as sub:
        await response.prepare(request)
        request[STREAM] = response
        stream = _Stream(response, sub, server.sse_heartbeat * STALL_HEARTBEATS)
        # Without this, a stream waiting for events learns its client is gone only when a
        # heartbeat fails to write, and holds its slot and subscription until then.
        on_lost(request, stream.lost)
        try:
            await stream.write(b": connected\n\n")
            if last is not None:
                last = await _replay(rt, stream, wanted, last)
            await _live(rt, stream, last or 0)
        except _Gone:
            logger.debug(
                "event stream to %s ended: its client closed the connection",
                request.remote,
                extra={"event": "events.client_gone"},
            )
        except OffloadError as exc:
            error = ErrorResponse(ErrorBody(code=exc.code, message=exc.message, field=exc.field))
            try:
                await stream.write(b"event: error\ndata: " + encode(error) + b"\n\n")
            except _Stalled:
                _reset(request, stream.stall)
        except _Stalled:
            _reset(request, stream.stall)
        finally:
            on_lost(request, None)  # the connection may carry other requests after this one
    return response


def _reset(request: web.Request, stall: float) -> None:
    transport = request.transport
    logger.info(
        "event stream to %s reset: its client took nothing for %gs",
        request.remote,
        stall,
        extra={"event": "events.stalled"},
    )
    if transport is not None:
        reset_connection(transport)


async def _replay(rt: Runtime, stream: _Stream, wanted: Filter, last: int) -> int:
    """Send every matching task changed after `last`, a page at a time, each page one store
    read bounded in rows (a filter that matches little walks a large store in many short
    reads, each queued behind the other readers' rather than holding the store); returns
    the change number the replay reached."""
    while True:
        found = await rt.store.changes(
            after=last,
            limit=PAGE,
            task_id=wanted.task_id,
            type=wanted.type,
            queue=wanted.queue,
            max_scan=SCAN_ROWS,
        )
        stream.check()
        for task in found.tasks:
            await stream.send(task)
            last = task.changed
        if found.scanned_to is not None:
            last = found.scanned_to
        elif len(found.tasks) < PAGE:
            return last


async def _live(rt: Runtime, stream: _Stream, last: int) -> None:
    heartbeat = rt.config.server.sse_heartbeat
    sub = stream.sub
    while not rt.events.closed.is_set():
        try:
            async with asyncio.timeout(heartbeat):
                await sub.ready.wait()
        except TimeoutError:
            await stream.write(b": keep-alive\n\n")
            continue
        sub.ready.clear()
        stream.check()
        while sub.pending:
            task = sub.take()
            if task.changed > last:
                await stream.send(task)
                last = task.changed
        if sub.overflowed:
            # Too far behind: end the stream; the client resumes with Last-Event-ID.
            await stream.write(b"event: overflow\ndata: {}\n\n")
            return
