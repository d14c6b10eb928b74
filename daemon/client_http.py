"""The client's HTTP (daemon/client.py): one request out, its 2xx answer back decoded, or
the error it is (`client_errors.py`). Two sessions: one for calls, one for long-polls,
which hold a connection for seconds each; in one pool, many waits would leave the other
calls queueing for a connection until they time out. Both go to the same place: TCP for an
`http(s)://` URL, or the unix socket of a `unix:/path` one (`endpoint()`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple, TypeVar

import aiohttp

from daemon.client_errors import Unreachable, answer_error, decode_answer

T = TypeVar("T")

UNIX_SCHEME = "unix:"  # as the daemon's server.listen spells a unix socket
# Requests over a unix socket still need a URL with a host (it becomes the Host header); the
# socket, not the name, decides where they go.
UNIX_BASE = "http://localhost"
SUN_PATH_MAX = 107  # bytes in a unix socket's path at most (sockaddr_un.sun_path, less NUL)


class Endpoint(NamedTuple):
    """Where requests go: `base` + the path, over TCP, or over the unix socket `socket`."""

    base: str
    socket: str | None


def endpoint(url: str) -> Endpoint:
    """The `Endpoint` of `url`: `http://host:port` or `https://...` (optionally with a path
    prefix), or `unix:/absolute/path` for a unix socket. `ValueError` says what is wrong."""
    if url.startswith(("http://", "https://")):
        return Endpoint(url.rstrip("/"), None)
    if not url.startswith(UNIX_SCHEME):
        raise ValueError(f"expected an http:// or https:// URL, or unix:/path/to.sock, not {url!r}")
    path = url.removeprefix(UNIX_SCHEME)
    # One leading slash, as in server.listen: "unix://x/y" reads as a host "x" elsewhere
    # (and Linux would take "//x/y" as "/x/y"), so it is refused rather than guessed.
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError(
            f'expected "unix:/absolute/path" (e.g. unix:/run/offload.sock), not {url!r}'
        )
    if "\0" in path:
        raise ValueError(f"the socket path of {url!r} holds a NUL")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(
            f"the socket path of {url!r} is longer than a unix socket's "
            f"({SUN_PATH_MAX} bytes at most)"
        )
    return Endpoint(UNIX_BASE, path)


class Reply(NamedTuple):
    """A 2xx answer: its status, its body, and the headers that say more than the body (an
    idempotent replay's `Idempotent-Replayed`)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Http:
    """The sessions to offload at `url` (see `endpoint()`; `ValueError` if it is not one).
    `url` is kept as given (an http one less its trailing slash), for the error messages."""

    def __init__(self, url: str, headers: Mapping[str, str], request_timeout: float) -> None:
        self._endpoint = endpoint(url)
        self.url = url if self._endpoint.socket is not None else self._endpoint.base
        self.request_timeout = request_timeout
        self._headers = dict(headers)
        self._calls: aiohttp.ClientSession | None = None
        self._polls: aiohttp.ClientSession | None = None

    def open(self, *, poll: bool = False) -> aiohttp.ClientSession:
        """The session for calls (or long-polls), opened on first use."""
        if poll:
            if self._polls is None:
                self._polls = self._session()
            return self._polls
        if self._calls is None:
            self._calls = self._session()
        return self._calls

    def _session(self) -> aiohttp.ClientSession:
        # Each session owns its connector (and closes it): the two pools stay apart on a
        # unix socket as they do on TCP.
        connector = None
        if self._endpoint.socket is not None:
            connector = aiohttp.UnixConnector(path=self._endpoint.socket)
        return aiohttp.ClientSession(headers=self._headers, connector=connector)

    async def aclose(self) -> None:
        """Close both sessions (idempotent)."""
        for session in (self._calls, self._polls):
            if session is not None:
                await session.close()
        self._calls = self._polls = None

    async def call(
        self,
        answer: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        extra: float | None = None,
    ) -> T:
        """A 2xx answer decoded as `answer` (see `exchange`)."""
        reply = await self.exchange(
            method, path, params=params, data=data, headers=headers, extra=extra
        )
        return decode_answer(reply.body, answer, reply.status)

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        extra: float | None = None,
    ) -> Reply:
        """The `Reply` of a 2xx answer; `ClientError` for any other (redirects are not
        followed: the API sends none, so one comes from something else), `Unreachable` for
        none. `extra` seconds (a long-poll, on the polls' session) are added to the
        request's timeout."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout + (extra or 0.0))
        try:
            async with self.open(poll=bool(extra)).request(
                method,
                self._endpoint.base + path,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise answer_error(resp.status, resp.reason, resp.headers, body)
                return Reply(resp.status, body, resp.headers)
        except aiohttp.ClientError as exc:
            reason = str(exc)
            if self._endpoint.socket is not None and isinstance(exc, aiohttp.ClientConnectorError):
                # aiohttp's text names a host and TLS, which a unix socket has neither of.
                reason = exc.strerror or reason
            raise Unreachable(f"cannot reach offload at {self.url}: {reason}") from exc
        except TimeoutError:
            raise Unreachable(f"no answer from offload at {self.url} in time") from None
