"""Bind the aiohttp application to its listening address, and close it in order."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from daemon.config import ServerConfig
from daemon.errors import ConfigError
from daemon.http_protocol import Runner
from daemon.metrics import Tally
from daemon.systemd import activated_socket

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
    """Serve `app` on the socket systemd passed us (socket activation), else on
    `config.listen`; yields the bound address. On exit the listener closes first, then open
    requests get `SHUTDOWN_TIMEOUT` seconds, then the app's cleanup runs. Requests aiohttp
    cannot parse are counted in `counts` (`http_protocol.py`). With `anonymous` (no tokens,
    and no `auth.allow_anonymous`), a socket from systemd must be a loopback one, as
    `server.listen` must (config.py): the unit's ListenStream= is config too."""
    runner = Runner(
        app, counts, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        where = parse_listen(config.listen)
        inherited = activated_socket()
        site: web.BaseSite
        if inherited is not None:
            bound = inherited.getsockname()
            if anonymous and not is_loopback(bound if isinstance(bound, str) else bound[:2]):
                raise ConfigError(
                    "offload.socket",
                    [
                        f"ListenStream= {bound[0]}:{bound[1]}: a non-loopback address needs "
                        f"tokens (auth.tokens_file or auth.credential), or "
                        f"auth.allow_anonymous = true"
                    ],
                )
            site = web.SockSite(runner, inherited)
        elif isinstance(where, str):
            site = web.UnixSite(runner, where)
        else:
            site = web.TCPSite(runner, where[0], where[1], backlog=1024)
        await site.start()
        yield site.name
    finally:
        await runner.cleanup()
