"""Batch ingest: tasks per second through POST /v1/tasks/batch with batches of 100 no-op
tasks (delayed an hour, so the figure is admission and commit alone), from a few
concurrent senders on loopback, for `store.synchronous` normal and full.

    .venv/bin/python bench/batch_ingest.py [--batch 100] [--senders 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import msgspec

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out


async def send(url: str, body: bytes, until: float, counts: list[int]) -> None:
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            async with http.post(
                f"{url}/v1/tasks/batch", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                counts[0 if resp.status == 202 else 1] += 1


async def load(url: str, batch: int, senders: int, seconds: float) -> tuple[float, int]:
    body = msgspec.json.encode({"tasks": [{"type": "noop", "payload": {}, "delay": 3600}] * batch})
    counts = [0, 0]
    began = time.monotonic()
    until = began + seconds
    await asyncio.gather(*(send(url, body, until, counts) for _ in range(senders)))
    elapsed = time.monotonic() - began
    return counts[0] * batch / elapsed, counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rows = [["synchronous", "batch", "senders", "tasks/s", "refused batches"]]
    other = harness.OtherLoad()
    for sync in ("normal", "full"):
        with harness.workdir() as directory:
            settings = harness.Settings(synchronous=sync, log_level="warning")
            with harness.daemon(directory, settings) as d:
                rate, refused = asyncio.run(load(d.url, args.batch, args.senders, args.seconds))
        rows.append([sync, str(args.batch), str(args.senders), f"{rate:,.0f}", str(refused)])
    out(harness.table(rows))
    out(harness.machine())
    out(other.report(0.0))
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
