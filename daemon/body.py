"""Request bodies: read within `server.body_timeout`, held to `server.max_body` both as sent
and once inflated, inflated only here (after auth: `http_protocol.py` leaves aiohttp's
inflation off)."""

from __future__ import annotations

import asyncio
import logging
import zlib

from aiohttp import hdrs, web

from daemon.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from daemon.runtime import RUNTIME

logger = logging.getLogger(__name__)


async def read_json(request: web.Request, limit: int) -> bytes:
    """The request's body, inflated if it was sent compressed, at most `limit` bytes both as
    sent and once inflated (413 past it). aiohttp inflates nothing (`http_protocol.py`):
    this runs after auth, so an unauthenticated sender cannot make the daemon inflate."""
    # The header as clients send it is compared before aiohttp parses it.
    if (
        request.headers.get("Content-Type") != "application/json"
        and request.content_type != "application/json"
    ):
        sent = request.headers.get("Content-Type") or "none"
        raise UnsupportedMediaType(
            f"send Content-Type: application/json (got {sent})",
            field="Content-Type",
        )
    coding = _content_coding(request)
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    body = request.content
    if length is not None and body.is_eof() and not body.exception():
        # The whole body came with the headers and its length is within the limit: take
        # it as it is, without request.read()'s loop of awaits (a tenth of a submission).
        data = body.read_nowait()
        if len(data) > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
    else:
        data = await _read_rest(request, limit)
    return data if coding is None else _inflate(data, coding, limit)


async def _read_rest(request: web.Request, limit: int) -> bytes:
    """The body of a request whose body did not all come with its headers: it must arrive
    within `server.body_timeout` of now (408 past it), or a client sending a byte now and
    then would hold its connection and this handler for as long as it liked. The timer is
    made here only: a body that came with its headers is never timed. A client that goes
    away meanwhile raises what `request.read()` raises (the route wrapper's concern)."""
    timeout = request.app[RUNTIME].config.server.body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is over {limit} bytes") from None
    except TimeoutError:
        # Debug only: every slow or stalled client would otherwise write to the journal.
        logger.debug(
            "request body from %s not in within %gs: answering 408 and closing",
            request.remote,
            timeout,
            extra={"event": "http.body_timeout", "status": 408},
        )
        raise RequestTimeout(
            f"the body did not arrive within server.body_timeout ({timeout:g}s)", field="body"
        ) from None


# Content-Encoding -> zlib's wbits ("deflate" is zlib-wrapped; a raw stream is taken too).
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_MAX_MEMBERS = 16  # gzip members one body may hold (concatenated files are valid gzip)


def _content_coding(request: web.Request) -> str | None:
    """The body's Content-Encoding: None for none or identity, else one of `_CODINGS`."""
    if hdrs.CONTENT_ENCODING not in request.headers:  # as nearly every request
        return None
    sent = ", ".join(request.headers.getall("Content-Encoding", ()))
    coding = sent.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _CODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {sent[:40]!r} is not supported; send gzip, deflate or none",
            field="Content-Encoding",
        )
    return coding


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """`data` inflated, stopping as soon as it is past `limit` (413): the work is bounded by
    the limit however much the body claims to hold."""
    wbits = _CODINGS[coding]
    if coding == "deflate" and data[:1] and data[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS  # no zlib header: a raw deflate stream, as some clients send
    out: list[bytes] = []
    size = 0
    rest = data
    for _ in range(_MAX_MEMBERS):
        inflater = zlib.decompressobj(wbits=wbits)
        try:
            chunk = inflater.decompress(rest, limit + 1 - size)
        except zlib.error:
            raise BadRequest(
                f"the body is not valid {coding} data", field="Content-Encoding"
            ) from None
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes once inflated")
        out.append(chunk)
        if not inflater.eof:
            raise BadRequest(f"the {coding} body ends early", field="Content-Encoding")
        rest = inflater.unused_data
        if not rest or wbits != _CODINGS["gzip"]:
            break
    if rest:
        raise BadRequest(f"data follows the {coding} body", field="Content-Encoding")
    return b"".join(out)
