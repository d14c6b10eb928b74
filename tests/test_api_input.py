"""Bad input to POST /v1/tasks: each gets the right 4xx at once, naming the field, the daemon
stays up, and nothing reaches the store (promise 5 of DESIGN.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from daemon.models import Counts
from tests.inproc import (  # noqa: F401 (api_fixture is the `api` fixture)
    Daemon,
    api_fixture,
    assert_error,
    stored_counts,
)

QUICK = 10.0  # seconds a refusal may take: far below a body-read timeout's
JSON_TYPE = {"Content-Type": "application/json"}


@dataclasses.dataclass(frozen=True)
class Bad:
    body: bytes
    status: int
    code: str
    field: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JSON_TYPE))
    chunked: bool = False


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def invalid(value: Any, field: str | None) -> Bad:
    return Bad(js(value), 422, "invalid", field)


DEEP = 10_000

CASES = [
    pytest.param(Bad(b'{"type": "noop",', 400, "bad_request"), id="malformed-json"),
    pytest.param(Bad(b"", 400, "bad_request"), id="empty-body"),
    pytest.param(invalid({"type": 5}, "type"), id="type-not-a-string"),
    pytest.param(invalid({"type": "noop", "priority": "high"}, "priority"), id="priority-str"),
    pytest.param(invalid({"type": "noop", "delay": "soon"}, "delay"), id="delay-str"),
    pytest.param(invalid({"type": "noop", "max_attempts": 0}, "max_attempts"), id="attempts-0"),
    pytest.param(invalid(["noop"], None), id="not-an-object"),
    pytest.param(invalid({"payload": {}}, "type"), id="type-missing"),
    pytest.param(invalid({"type": "noop", "colour": "red"}, "colour"), id="unknown-field"),
    pytest.param(invalid({"type": "nope"}, "type"), id="unknown-type"),
    pytest.param(
        invalid({"type": "sleep", "payload": {"seconds": "soon"}}, "payload.seconds"),
        id="payload-wrong-type",
    ),
    pytest.param(
        invalid({"type": "sleep", "payload": {"seconds": -1}}, "payload.seconds"),
        id="payload-out-of-range",
    ),
    pytest.param(
        invalid({"type": "sleep", "payload": {}}, "payload.seconds"), id="payload-missing-field"
    ),
    pytest.param(
        invalid({"type": "noop", "delay": 5, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
        id="delay-and-run_at",
    ),
    pytest.param(
        invalid({"type": "noop", "run_at": "2030-01-01T00:00:00"}, "run_at"), id="run_at-no-tz"
    ),
    pytest.param(invalid({"type": "noop", "timeout": 61}, "timeout"), id="timeout-over-type"),
    pytest.param(invalid({"type": "noop", "timeout": 0}, "timeout"), id="timeout-zero"),
    pytest.param(invalid({"type": "noop", "priority": -1001}, "priority"), id="priority-low"),
    pytest.param(invalid({"type": "noop", "priority": 1001}, "priority"), id="priority-high"),
    pytest.param(invalid({"type": "noop", "queue": "no spaces"}, "queue"), id="queue-name"),
    # Valid JSON that Python cannot hold: accepted, it would fail every attempt.
    pytest.param(
        Bad(b'{"type": "noop", "payload": {"a": 1e400}}', 422, "invalid", "payload"),
        id="payload-number-beyond-a-double",
    ),
    pytest.param(
        Bad(b'{"type": "noop", "payload": [' + b"9" * 5000 + b"]}", 422, "invalid", "payload.[0]"),
        id="payload-integer-of-5000-digits",
    ),
    pytest.param(
        Bad(js({"type": "noop"}), 415, "unsupported_media_type", "Content-Type", headers={}),
        id="no-content-type",
    ),
    pytest.param(
        Bad(
            js({"type": "noop"}),
            415,
            "unsupported_media_type",
            "Content-Type",
            headers={"Content-Type": "text/plain"},
        ),
        id="wrong-content-type",
    ),
    pytest.param(
        Bad(js({"type": "noop", "payload": "x" * 70_000}), 413, "too_large"),
        id="over-max-body",
    ),
    pytest.param(
        Bad(js({"type": "noop", "payload": "x" * 70_000}), 413, "too_large", chunked=True),
        id="over-max-body-chunked",
    ),
    # Content-Length counts the compressed bytes; the limit is on what they inflate to.
    pytest.param(
        Bad(
            gzip.compress(js({"type": "noop", "payload": "x" * 200_000})),
            413,
            "too_large",
            headers={**JSON_TYPE, "Content-Encoding": "gzip"},
        ),
        id="over-max-body-once-inflated",
    ),
    pytest.param(
        Bad(
            js({"type": "noop"}),
            415,
            "unsupported_media_type",
            "Content-Encoding",
            headers={**JSON_TYPE, "Content-Encoding": "br"},
        ),
        id="unknown-content-encoding",
    ),
    pytest.param(
        Bad(
            gzip.compress(js({"type": "noop", "payload": "x" * 1000}))[:-12],
            400,
            "bad_request",
            "Content-Encoding",
            headers={**JSON_TYPE, "Content-Encoding": "gzip"},
        ),
        id="truncated-gzip",
    ),
    pytest.param(
        Bad(
            js({"type": "noop"}),
            400,
            "bad_request",
            "Content-Encoding",
            headers={**JSON_TYPE, "Content-Encoding": "gzip"},
        ),
        id="not-gzip",
    ),
    pytest.param(
        Bad(b'{"type": "noop", "payload": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "bad_request"),
        id="nested-10000-deep",
    ),
    pytest.param(Bad(b'{"type": "no\xffop"}', 400, "bad_request"), id="non-utf8-in-type"),
    pytest.param(
        Bad(b'{"type": "noop", "payload": {"x": "\xff"}}', 400, "bad_request"),
        id="non-utf8-in-untyped-payload",
    ),
    pytest.param(
        Bad(b'{"type": "sleep", "payload": {"seconds": 1, "\xff": 2}}', 400, "bad_request"),
        id="non-utf8-in-typed-payload",
    ),
]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]


async def test_a_compressed_body_within_the_limit_is_accepted(api: Daemon) -> None:
    body = gzip.compress(js({"type": "noop", "payload": {"text": "x" * 30_000}, "delay": 3600}))
    headers = {**JSON_TYPE, "Content-Encoding": "gzip"}
    reply = await api.request("POST", "/v1/tasks", data=body, headers=headers)
    assert reply.status == 202, reply.body
    stored = await api.request("GET", reply.headers["Location"])
    assert stored.body["payload"] == {"text": "x" * 30_000}


def _raw_deflate(data: bytes) -> bytes:
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflate.compress(data) + deflate.flush()


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),  # 2 members
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),  # no zlib header, as some clients send it
        ("identity", lambda data: data),
    ],
    ids=["gzip", "x-gzip", "gzip-members", "deflate", "raw-deflate", "identity"],
)
async def test_each_content_coding_is_inflated(
    api: Daemon, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    body = compress(js({"type": "noop", "payload": {"text": "y" * 5000}, "delay": 3600}))
    headers = {**JSON_TYPE, "Content-Encoding": coding}
    reply = await api.request("POST", "/v1/tasks", data=body, headers=headers)
    assert reply.status == 202, reply.body
    assert reply.body["payload"] == {"text": "y" * 5000}


@pytest.mark.parametrize("bad", CASES)
async def test_bad_input_is_refused_and_changes_nothing(api: Daemon, bad: Bad) -> None:
    assert api.config.server.max_body == 64 * 1024  # what the size cases are built for
    before = await api.count()

    data: bytes | AsyncIterator[bytes] = _chunks(bad.body) if bad.chunked else bad.body
    skip = () if "Content-Type" in bad.headers else ("Content-Type",)
    reply = await api.request(
        "POST", "/v1/tasks", data=data, headers=bad.headers, skip_auto_headers=skip
    )

    assert_error(reply, bad.status, bad.code, bad.field)
    assert reply.elapsed < QUICK
    assert await api.count() == before
    # The daemon is still up and takes good work; then the store holds that task alone.
    good = await api.request("POST", "/v1/tasks", json={"type": "noop", "delay": 3600})
    assert good.status == 202, good.body
    assert not api.serving.done()
    await api.shutdown()
    counts = await stored_counts(api.config)
    assert counts == Counts(queued=1)


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Content-Type": "text/plain; charset=latin-1"}, "text/plain; charset=latin-1"),
        ({}, "none"),
    ],
)
async def test_a_415_names_the_content_type_that_was_sent(
    api: Daemon, headers: dict[str, str], named: str
) -> None:
    skip = () if headers else ("Content-Type",)
    reply = await api.request(
        "POST", "/v1/tasks", data=js({"type": "noop"}), headers=headers, skip_auto_headers=skip
    )
    assert_error(reply, 415, "unsupported_media_type", "Content-Type")
    assert reply.body["error"]["message"] == f"send Content-Type: application/json (got {named})"


UNPARSEABLE = [
    pytest.param(b"GARBAGE\r\n\r\n", id="no-method"),
    pytest.param(
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", id="content-length"
    ),
    pytest.param(
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        id="header-too-long",
    ),
]


@pytest.mark.parametrize("request_bytes", UNPARSEABLE)
async def test_a_request_aiohttp_cannot_parse_gets_the_json_error_shape(
    api: Daemon, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Answered before any route sees it: still the contract's JSON error, counted, and no
    ERROR line with a traceback for what is the client's fault."""
    host, _, port = api.config.server.listen.rpartition(":")
    before = await api.count()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request_bytes)
        async with asyncio.timeout(QUICK):
            raw = await reader.read()  # the daemon closes the connection after the answer
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == "400", raw
    assert "content-type: application/json" in {h.lower() for h in headers}
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert error["message"].startswith("malformed HTTP request: ")
    assert "aaaa" not in error["message"]  # the client's bytes are not echoed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    metrics = await api.request("GET", "/metrics")
    assert 'offload_http_requests_total{code="400",route="malformed"} 1.0' in metrics.body
    good = await api.request("POST", "/v1/tasks", json={"type": "noop", "delay": 3600})
    assert good.status == 202, good.body
    assert await api.count() == before + 1
