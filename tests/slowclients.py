"""Helpers for the tests of clients that read slowly or not at all: configs with `[server]`
and `[auth]` settings, raw connections with a small receive buffer whose unread bytes stay
with the daemon, and a look at whether the daemon reset one (without reading from it)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from tests.harness import HOST, DaemonConfig, TomlValue, free_port, render_toml

SMALL_RCVBUF = 4096  # the kernel keeps little for a client that does not read
NOOP = "daemon.builtins:noop"


def write_config(
    path: Path,
    *,
    server: Mapping[str, TomlValue] | None = None,
    auth: Mapping[str, TomlValue] | None = None,
    port: int | None = None,
) -> DaemonConfig:
    """A config at `path`: 127.0.0.1:`port` (a free one by default) with `server` settings,
    SQLite beside `path`, `auth` settings, and the task type `noop`."""
    port = port or free_port()
    db = path.with_suffix(".db")
    tables: dict[str, Mapping[str, TomlValue]] = {
        "server": {"listen": f"{HOST}:{port}", **(server or {})},
        "store": {"url": f"sqlite:///{db}", "synchronous": "normal"},
        "auth": dict(auth or {}),
        "log": {"level": "info"},
        "types.noop": {"kind": "python", "handler": NOOP},
    }
    path.write_text(render_toml(tables), encoding="utf-8")
    return DaemonConfig(path=path, url=f"http://{HOST}:{port}", db=db)


def write_tokens(path: Path, lines: Mapping[str, tuple[str, str]]) -> None:
    """A tokens file: name → (scopes, token), mode 600."""
    path.write_text("".join(f"{n} {s} {t}\n" for n, (s, t) in lines.items()))
    path.chmod(0o600)


def request(path: str, *headers: str, method: str = "GET") -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


@asynccontextmanager
async def unread_connection(
    url: str, sent: bytes, *, rcvbuf: int | None = SMALL_RCVBUF
) -> AsyncIterator[socket.socket]:
    """A connection to `url` (http://HOST:PORT) with a receive buffer of `rcvbuf` bytes (or
    the kernel's) and `sent` written on it; the caller reads what it wants of it. Closed on
    exit."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, sent)
        yield sock
    finally:
        sock.close()


async def read_until(sock: socket.socket, marker: bytes, *, limit: int = 1 << 20) -> bytes:
    """Read from `sock` until what was read ends with `marker` or holds it in its last
    chunk (callers bound the wait), at most `limit` bytes."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            raise AssertionError(f"the connection ended before {marker!r}: {got[-200:]!r}")
        got += chunk
        # Where the marker may be: in this chunk, or across its start.
        if marker in got[-len(chunk) - len(marker) :]:
            return bytes(got)
        assert len(got) <= limit, f"no {marker!r} in the first {limit} bytes"


async def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of one answer off `sock`; the body is
    what Content-Length says, none without it (a stream: only its head is read)."""
    got = await read_until(sock, b"\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (h.partition(": ") for h in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = await asyncio.get_running_loop().sock_recv(sock, 65536)
        assert chunk, "the connection ended within the body"
        body += chunk
    return int(status_line.split(" ")[1]), headers, body[:length]


async def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the daemon closes the connection (callers bound the wait)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


async def reset(sock: socket.socket) -> bool | None:
    """True once the daemon reset the connection (its pending error, read without taking
    any of the bytes waiting); None until then. For `eventually()`."""
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error == 0:
        return None
    assert error == errno.ECONNRESET, errno.errorcode.get(error, error)
    return True
