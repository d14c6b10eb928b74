"""JSON answers written to the connection as one block of bytes.

aiohttp's `web.Response` builds a header multidict for each answer, then on the way out
checks it for cookies, compression, chunking, Content-Length, Date, Server and Connection,
serialises it and hands headers and body to the transport: the code behind the tenth of
the event loop's time a single submission spent writing its answer, beyond the send
itself. A `JsonAnswer` knows it carries a complete JSON body, so it writes the status
line, its few headers and the body in one `transport.write()`, the headers aiohttp would
have sent included (Date, Server, Connection as keep-alive requires).

It goes aiohttp's own way, as a plain response, whenever that could matter: a HEAD
request, an application with `on_response_prepare` receivers (they may change headers;
`adev runserver` adds one), a status other than 200, 201 or 202, or a header of its own
that it would write itself (Content-Type, Date...). Cookies and compression it refuses.

A large answer written whole sits in the transport's buffer for as long as its client does
not read it (a page of tasks is up to 8 MiB). So the connection's next request waits until
it is sent (as aiohttp's own responses do), and a connection left with more than
`WATCH_ABOVE` bytes unsent is watched: one that sends less than `MIN_PROGRESS` bytes in
`STALL` seconds is reset, and when the watched connections together hold more than
`UNSENT_BUDGET` bytes, the longest watched ones are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import struct
import time
from email.utils import formatdate
from http.cookies import SimpleCookie

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
WATCH_ABOVE = 1024 * 1024  # unsent bytes past which a connection is watched
STALL = 5.0  # seconds between two looks at a watched connection
MIN_PROGRESS = 64 * 1024  # bytes a watched connection must send between two looks
UNSENT_BUDGET = 128 * 1024 * 1024  # unsent bytes of all watched connections together
_LINGER_OFF = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


class _Date:
    """The Date header's value, made once a second."""

    second = -1
    value = b""


def _date() -> bytes:
    now = time.time()
    second = int(now)
    if second != _Date.second:
        _Date.value = formatdate(now, usegmt=True).encode()
        _Date.second = second
    return _Date.value


def _status_line(status: int, version: str) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/{version} {status} {reason}\r\n".encode()


# Status lines and the headers every answer has, by (status, HTTP version).
_HEADS = {
    (status, version): _status_line(status, f"{version.major}.{version.minor}")
    + b"Content-Type: " + CONTENT_TYPE.encode() + b"\r\n"
    + b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
    for status in (200, 201, 202)
    for version in (HttpVersion10, HttpVersion11)
}  # fmt: skip


# Headers `_head` writes itself: one set on the response sends it aiohttp's way instead.
_WRITTEN_HERE = frozenset(
    name.lower()
    for name in (
        hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.DATE, hdrs.SERVER, hdrs.CONNECTION,
        hdrs.TRANSFER_ENCODING,
    )
)  # fmt: skip


class JsonAnswer(web.StreamResponse):
    """A response with a JSON body (bytes, already encoded). Headers may be added through
    `headers` until it is sent, as on any response; it carries no cookies and is not
    compressed (JSON answers here are small)."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__(status=status)
        self.json_body = body
        self._written = False
        self._keep = False
        self._plain: web.Response | None = None  # when it goes aiohttp's way
        self._writer: AbstractStreamWriter | None = None  # to wait on a large answer's send

    @property
    def prepared(self) -> bool:
        return self._written or (self._plain is not None and self._plain.prepared)

    @property
    def keep_alive(self) -> bool | None:
        if self._written:
            return self._keep
        return self._plain.keep_alive if self._plain is not None else super().keep_alive

    @property
    def body_length(self) -> int:
        if self._written:
            return len(self.json_body)
        return self._plain.body_length if self._plain is not None else 0

    @property
    def cookies(self) -> SimpleCookie:
        raise TypeError("a JsonAnswer carries no cookies")

    def enable_compression(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a JsonAnswer is not compressed")

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        head = self._head(request)
        if head is None:
            typed = hdrs.CONTENT_TYPE in self.headers
            self._plain = web.Response(
                body=self.json_body,
                status=self.status,
                headers=self.headers,
                content_type=None if typed else CONTENT_TYPE,
            )
            if super().keep_alive is False:
                self._plain.force_close()
            writer = await self._plain.prepare(request)
            if len(self.json_body) > WATCH_ABOVE and request.transport is not None:
                # Its write_eof() writes the body, then waits until it is sent: look then.
                asyncio.get_running_loop().call_soon(watch_unsent, request.transport)
            return writer
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client is gone")
        transport.write(head + self.json_body)
        self._written = True
        if len(self.json_body) > WATCH_ABOVE:
            self._writer = request.writer
            watch_unsent(transport)
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        if self._plain is not None:
            await self._plain.write_eof()
        elif self._writer is not None:
            # The connection's next request waits until this answer is sent (or reset).
            await self._writer.drain()

    def _head(self, request: web.BaseRequest) -> bytes | None:
        """The status line and headers to write, or None to go aiohttp's way."""
        version = request.version
        common = _HEADS.get((self.status, version))
        if (
            common is None
            or request.method == hdrs.METH_HEAD
            or not isinstance(request, web.Request)
            or request.app.on_response_prepare
        ):
            return None
        extra = ""
        headers = self.headers
        if headers:
            for name, value in headers.items():
                if name.lower() in _WRITTEN_HERE:
                    return None
                extra += name + ": " + value + "\r\n"
            # Each header brought exactly one CR and one LF: none hides in a name or value
            # (aiohttp would refuse such a header, and so does its way).
            if not extra.count("\r") == extra.count("\n") == len(headers):
                return None
        keep = super().keep_alive
        keep = request.keep_alive if keep is None else keep
        if keep:
            connection = b"Connection: keep-alive\r\n" if version == HttpVersion10 else b""
        else:
            connection = b"Connection: close\r\n" if version == HttpVersion11 else b""
        self._keep = keep
        return b"%sContent-Length: %d\r\nDate: %s\r\n%s%s\r\n" % (
            common,
            len(self.json_body),
            _date(),
            extra.encode(),
            connection,
        )


# -- answers the client does not take ------------------------------------------------------

# Watched connections, longest watched first: their unsent bytes at the last look.
_watched: dict[asyncio.Transport, int] = {}


def watch_unsent(transport: asyncio.Transport) -> None:
    """Watch `transport` if more than `WATCH_ABOVE` bytes wait in its buffer: every `STALL`
    seconds it must have sent `MIN_PROGRESS` bytes more, until less than that waits, or it
    is reset. Past `UNSENT_BUDGET` bytes in all watched buffers, the longest watched ones
    are reset at once."""
    unsent = transport.get_write_buffer_size()
    if unsent <= WATCH_ABOVE:
        return
    if transport not in _watched:
        asyncio.get_running_loop().call_later(STALL, _look, transport)
    # A later answer on a watched connection (the earlier one was sent: the request waited
    # for it) counts its progress from here.
    _watched[transport] = unsent
    _keep_to_budget()


def _look(transport: asyncio.Transport) -> None:
    before = _watched.get(transport)
    if before is None:
        return  # reset already, by the budget
    unsent = 0 if transport.is_closing() else transport.get_write_buffer_size()
    if unsent <= WATCH_ABOVE:
        del _watched[transport]
    elif before - unsent < MIN_PROGRESS:
        del _watched[transport]
        _cut(transport, f"it sent {max(before - unsent, 0)} bytes in {STALL:g}s")
    else:
        _watched[transport] = unsent  # in place: it stays as long watched as it was
        asyncio.get_running_loop().call_later(STALL, _look, transport)


def _keep_to_budget() -> None:
    sizes = {}
    for transport in list(_watched):
        if transport.is_closing():
            del _watched[transport]
        else:
            sizes[transport] = transport.get_write_buffer_size()
    total = sum(sizes.values())
    for transport, unsent in sizes.items():
        if total <= UNSENT_BUDGET:
            return
        del _watched[transport]
        total -= unsent
        _cut(transport, f"unsent answers are over {UNSENT_BUDGET} bytes in all")


def _cut(transport: asyncio.Transport, why: str) -> None:
    logger.debug(
        "connection from %s reset with %d bytes of its answer unsent: %s",
        transport.get_extra_info("peername"),
        transport.get_write_buffer_size(),
        why,
        extra={"event": "http.answer_unsent"},
    )
    reset_connection(transport)


def reset_connection(transport: asyncio.Transport) -> None:
    """Close `transport` at once with a TCP reset: what is unsent is dropped, here and in the
    kernel (a plain close would leave the kernel's buffer waiting on a client that does not
    read). A unix socket is just closed."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    transport.abort()
