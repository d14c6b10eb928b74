"""The baseline of `ingest.py`: aiohttp on uvloop whose only route, POST /v1/tasks, parses the
JSON body and answers 202 with a small JSON body; no store, no validation beyond parsing.

    .venv/bin/python -m bench.bare_server --port 8081
"""

from __future__ import annotations

import argparse
import asyncio

import msgspec
import uvloop
from aiohttp import web

_ANSWER = msgspec.json.encode({"id": "01J0000000000000000000000", "state": "queued"})


async def submit(request: web.Request) -> web.Response:
    msgspec.json.decode(await request.read())
    return web.Response(status=202, body=_ANSWER, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/tasks", submit)
    app.router.add_get("/readyz", readyz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
