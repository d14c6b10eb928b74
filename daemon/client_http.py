"""The client's HTTP (daemon/client.py): one request out, its 2xx answer back decoded, or
the error it is (`client_errors.py`). Two sessions: one for calls, one for long-polls,
which hold a connection for seconds each; in one pool, many waits would leave the other
calls queueing for a connection until they time out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, TypeVar

import aiohttp

from daemon.client_errors import Unreachable, answer_error, decode_answer

T = TypeVar("T")


class Reply(NamedTuple):
    """A 2xx answer: its status, its body, and the headers that say more than the body (an
    idempotent replay's `Idempotent-Replayed`)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Http:
    def __init__(self, url: str, headers: Mapping[str, str], request_timeout: float) -> None:
        self.url = url
        self.request_timeout = request_timeout
        self._headers = dict(headers)
        self._calls: aiohttp.ClientSession | None = None
        self._polls: aiohttp.ClientSession | None = None

    def open(self, *, poll: bool = False) -> aiohttp.ClientSession:
        """The session for calls (or long-polls), opened on first use."""
        if poll:
            if self._polls is None:
                self._polls = aiohttp.ClientSession(headers=self._headers)
            return self._polls
        if self._calls is None:
            self._calls = aiohttp.ClientSession(headers=self._headers)
        return self._calls

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
                self.url + path,
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
            raise Unreachable(f"cannot reach offload at {self.url}: {exc}") from exc
        except TimeoutError:
            raise Unreachable(f"no answer from offload at {self.url} in time") from None
