"""The listeners of `open_http`: what the start line and systemd's STATUS= call them."""

from __future__ import annotations

import tempfile

from aiohttp import web

from daemon.config import ServerConfig
from daemon.http_server import open_http
from daemon.metrics import Metrics
from tests.harness import free_port


async def test_a_listener_is_named_as_server_listen_spells_it() -> None:
    with tempfile.TemporaryDirectory(prefix="offload-") as directory:
        path = f"{directory}/o.sock"
        unix = ServerConfig(listen=f"unix:{path}")
        async with open_http(web.Application(), unix, Metrics().http) as where:
            assert where == f"unix:{path}"  # not aiohttp's "http://unix:/…/o.sock:"
    port = free_port()
    tcp = ServerConfig(listen=f"127.0.0.1:{port}")
    async with open_http(web.Application(), tcp, Metrics().http) as where:
        assert where == f"http://127.0.0.1:{port}"
