"""The `http` kind: POST the payload as JSON to the `url` fixed in the config.

Each request carries `Content-Type: application/json`, `X-Offload-Task-Id`,
`X-Offload-Attempt` and, when the type has a `secret_file`,
`X-Offload-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
2xx succeeds: the body (at most `max_response` bytes, else a permanent failure) is the
result, JSON when it parses, else text (empty: null). 408, 429, 5xx, connection errors and
connect timeouts are retried, no sooner than a `Retry-After` (`RetryAfter`). Redirects are
never followed: a 3xx fails permanently, as does any other 4xx.

A receiver verifies a request: split the header on "," into `t=` and `v1=`; compute
hex(HMAC-SHA256(secret, t + "." + raw body bytes)) and compare it with `v1` in constant time
(`hmac.compare_digest`); reject a `t` more than 5 minutes from its clock (replays). The
secret is the file's content without its trailing newline. Deliveries are at least once:
deduplicate on X-Offload-Task-Id.

All `http` types share one `HttpClient` (one ClientSession and connection pool); each type
holds at most `max_connections` requests in flight.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import time
from datetime import UTC
from pathlib import Path

import aiohttp
import msgspec
import yarl

from daemon import __version__, redact
from daemon.executors.base import JSON, Executor, Job, Permanent, RetryAfter

SIGNATURE_HEADER = "X-Offload-Signature"
MAX_RETRY_AFTER = 86400.0  # a server cannot park a task for more than a day per attempt
_CHUNK = 64 * 1024
_SNIPPET = 200  # characters of an error response quoted in the failure


class HttpStatusError(Exception):
    """The server answered with a retryable status (408, 429, 5xx) and no Retry-After."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ConnectTimeout(Exception):
    """No connection within `connect_timeout`: retryable."""


class HttpClient:
    """The one aiohttp ClientSession that every `http` task type shares.

    Constructing it does nothing; the session opens on first use, inside the running loop.
    `aclose()` closes it; call it once the consumers have exited (later use raises
    RuntimeError). The session keeps no cookies and ignores proxy variables of the
    environment; each request brings its own timeouts.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the http client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No pool-wide limit: each type's max_connections bounds its own share.
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": f"offload/{__version__}"},
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def check_url(url: str) -> str | None:
    """Why `url` cannot be a target (None: it can)."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        return f"not a URL: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "expected an absolute http:// or https:// URL"
    return None


def read_secret(path: str) -> bytes:
    """The signing secret: the file's bytes without trailing newlines. Raises OSError, or
    ValueError when it is empty."""
    secret = Path(path).read_bytes().rstrip(b"\r\n")
    if not secret:
        raise ValueError("the secret file is empty")
    return secret


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The X-Offload-Signature value for `body` sent at `timestamp` (Unix seconds)."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), clamped to
    [0, MAX_RETRY_AFTER]; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        delay = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = when.timestamp() - now
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


def http_executor(
    url: str,
    *,
    client: HttpClient,
    secret: bytes | None,
    connect_timeout: float,
    max_connections: int,
    max_response: int,
) -> Executor:
    """Build the executor for one configured URL."""
    slots = asyncio.Semaphore(max_connections)
    shown = redact.url(url)

    async def run(job: Job) -> JSON:
        body = msgspec.json.encode(job.payload)
        headers = {
            "Content-Type": "application/json",
            "X-Offload-Task-Id": job.task_id,
            "X-Offload-Attempt": str(job.attempt),
        }
        async with slots:
            remaining = job.deadline - time.time()
            if remaining <= 0:
                raise TimeoutError("the task's deadline passed before the request was sent")
            if secret is not None:
                headers[SIGNATURE_HEADER] = sign(secret, body, int(time.time()))
            timeout = aiohttp.ClientTimeout(total=remaining, connect=connect_timeout)
            try:
                async with client.session().post(
                    url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    return await _outcome(response, max_response)
            except aiohttp.ServerTimeoutError as exc:
                if time.time() >= job.deadline:
                    raise TimeoutError(f"POST {shown}: the task's deadline passed") from exc
                raise ConnectTimeout(
                    f"POST {shown}: no connection within {connect_timeout:g}s"
                ) from exc

    return run


async def _outcome(response: aiohttp.ClientResponse, max_response: int) -> JSON:
    status = response.status
    if 200 <= status < 300:
        data = await _read_capped(response, max_response)
        if not data.strip():
            return None
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            return data.decode("utf-8", "replace")
    # The task's last_error is readable by every client: no password, no query token.
    said = f"POST {redact.url(str(response.url))} answered {status} {response.reason or ''}"
    said = said.rstrip()
    if 300 <= status < 400:
        location = response.headers.get("Location")
        where = "nowhere" if location is None else redact.url(location)
        raise Permanent(f"{said}: redirects are not followed (to {where})")
    snippet = await _snippet(response)
    message = f"{said}: {snippet}" if snippet else said
    if status in (408, 429) or status >= 500:
        delay = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if delay is not None:
            raise RetryAfter(f"{message} (retry after {delay:g}s)", delay)
        raise HttpStatusError(message, status)
    raise Permanent(message)


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, or Permanent once it is known to exceed `cap` bytes (the request was
    delivered and handled, so another attempt would repeat it to the same end)."""
    declared = response.content_length
    if declared is not None and declared > cap:
        raise Permanent(f"the response is {declared} bytes, over max_response ({cap})")
    data = bytearray()
    while chunk := await response.content.read(_CHUNK):
        data += chunk
        if len(data) > cap:
            raise Permanent(f"the response is over max_response ({cap} bytes)")
    return bytes(data)


async def _snippet(response: aiohttp.ClientResponse) -> str:
    """The start of an error body, on one line, for the task's last_error."""
    try:
        head = await response.content.read(_SNIPPET)
    except aiohttp.ClientError:
        return ""
    return " ".join(head.decode("utf-8", "replace").split())[:_SNIPPET]
