"""Bind the aiohttp application to its listening address (or every socket systemd passed),
and close it in order."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from daemon.config import ServerConfig
from daemon.errors import ConfigError
from daemon.http_protocol import Runner
from daemon.metrics import Tally
from daemon.systemd import activated_sockets

SHUTDOWN_TIMEOUT = 5.0  # seconds open requests get once the listener closes


def parse_listen(listen: str) -> tuple[str, int] | str:
    """`host:port`, `[v6]:port`, or `unix:/path` (returned as the path)."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError('expected "unix:/absolute/path"')
        return path
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError('expected "HOST:PORT" (e.g. "127.0.0.1:8080") or "unix:/path"')
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1]
        if not (host.startswith("[") and host.endswith("]")) or "[" in inner or "]" in inner:
            raise ValueError('expected "[IPv6]:PORT", e.g. "[::1]:8080"')
        host = inner
    return host, int(port)


def is_loopback(where: tuple[str, int] | str) -> bool:
    """A unix socket (guarded by file permissions) or a loopback host."""
    if isinstance(where, str):
        return True
    host = where[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def open_http(
    app: web.Application, config: ServerConfig, counts: Tally, *, anonymous: bool = False
) -> AsyncIterator[str]:
    """Serve `app` on every socket systemd passed us (socket activation), else on
    `config.listen`; yields the bound addresses (joined with " and ", for the start line):
    `http://host:port`, or `unix:/path` as `server.listen` spells a unix socket.
    On exit the listeners close first, then open requests get `SHUTDOWN_TIMEOUT` seconds,
    then the app's cleanup runs. Requests aiohttp cannot parse are counted in `counts`
    (`http_protocol.py`). With `anonymous` (no tokens, and no `auth.allow_anonymous`), each
    socket from systemd must be a loopback or unix one, as `server.listen` must
    (config.py): the unit's ListenStream= is config too."""
    runner = Runner(
        app, counts, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        sites = _sites(runner, config, anonymous=anonymous)
        for site, _ in sites:
            await site.start()
        yield " and ".join(name for _, name in sites)
    finally:
        await runner.cleanup()


# A site and its address for messages. aiohttp's own names are kept for TCP; a unix socket
# it names "http://unix:/path:", which reads as a malformed URL.
Named = tuple[web.BaseSite, str]


def _sites(runner: web.BaseRunner, config: ServerConfig, *, anonymous: bool) -> list[Named]:
    """The sites to start, each with its name: one per socket from systemd, or the one of
    `config.listen`. Every socket is checked before any site starts, so a refused one
    serves nothing."""
    where = parse_listen(config.listen)
    inherited = activated_sockets()
    if not inherited:
        if isinstance(where, str):
            return [(web.UnixSite(runner, where), f"unix:{where}")]
        site = web.TCPSite(runner, where[0], where[1], backlog=1024)
        return [(site, site.name)]
    problems = [
        f"ListenStream= {_describe(sock)} (fd {sock.fileno()}): a non-loopback address needs "
        f"tokens (auth.tokens_file or auth.credential), or auth.allow_anonymous = true"
        for sock in inherited
        if not is_loopback(_address(sock))
    ]
    if anonymous and problems:
        for sock in inherited:
            sock.close()
        raise ConfigError("offload.socket", problems)
    # The server listen()s again with `backlog`; aiohttp's default (128) would shrink the
    # unit's Backlog= (4096). The kernel caps it at net.core.somaxconn, as it caps systemd.
    return [_sock_site(runner, sock) for sock in inherited]


def _sock_site(runner: web.BaseRunner, sock: socket.socket) -> Named:
    site = web.SockSite(runner, sock, backlog=socket.SOMAXCONN)
    return site, _describe(sock) if sock.family == socket.AF_UNIX else site.name


def _address(sock: socket.socket) -> tuple[str, int] | str:
    """What `is_loopback` takes: (host, port), or a unix socket's name (abstract ones too)."""
    if sock.family == socket.AF_UNIX:
        return _describe(sock)
    host, port = sock.getsockname()[:2]
    return host, port


def _describe(sock: socket.socket) -> str:
    """`host:port`, `[v6]:port`, `unix:/path` or `unix:@abstract`, for messages."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # an abstract name: a NUL, then any bytes
            return "unix:@" + name[1:].decode(errors="replace")
        return f"unix:{name}"
    host, port = name[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
