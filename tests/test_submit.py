"""Submitting safely and in bulk: Idempotency-Key (replay, reuse with another body, racing
duplicates, scope per token, window), batches (order, all-or-nothing, limits), and what is
refused at the door rather than failing at run time (names, numbers Python cannot hold)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from daemon.executors.base import JSON
from tests.inproc import assert_error, open_daemon

KEYED = {"Idempotency-Key": "order-42"}
JSON_BODY = {"Content-Type": "application/json"}


class Order(msgspec.Struct):  # unknown fields are skipped, not refused
    order: int


async def typed(payload: Order) -> JSON:
    return {"order": payload.order}


async def test_a_replay_returns_the_original_task_and_creates_none(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        body = {"type": "noop", "payload": {"n": 1}}
        first = await daemon.request("POST", "/v1/tasks", json=body, headers=KEYED)
        again = await daemon.request("POST", "/v1/tasks", json=body, headers=KEYED)
        assert (first.status, again.status) == (202, 202)
        assert again.body["id"] == first.body["id"]
        assert again.headers["Location"] == first.headers["Location"]
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert "Idempotent-Replayed" not in first.headers
        assert await daemon.count() == 1


async def test_the_same_key_with_another_body_is_refused(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        await daemon.request("POST", "/v1/tasks", json={"type": "noop"}, headers=KEYED)
        other = {"type": "noop", "payload": {"different": True}}
        reply = await daemon.request("POST", "/v1/tasks", json=other, headers=KEYED)
        assert_error(reply, 422, "idempotency_key_reused", "Idempotency-Key")
        assert await daemon.count() == 1


async def test_racing_duplicates_create_exactly_one_task(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        body = {"type": "noop", "payload": {"race": True}}
        replies = await asyncio.gather(
            *(daemon.request("POST", "/v1/tasks", json=body, headers=KEYED) for _ in range(20))
        )
        assert {r.status for r in replies} == {202}
        assert len({r.body["id"] for r in replies}) == 1
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 19
        assert await daemon.count() == 1


async def test_keys_are_scoped_per_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a submit,read aaaaaaaaaaaaaaaaaaaa\nb submit,read bbbbbbbbbbbbbbbbbbbb\n")
    async with open_daemon(tmp_path, {"auth": {"tokens_file": str(tokens)}}) as daemon:
        ids = set()
        for secret in ("a" * 20, "b" * 20, "a" * 20):
            headers = {**KEYED, "Authorization": f"Bearer {secret}"}
            reply = await daemon.request(
                "POST", "/v1/tasks", json={"type": "noop"}, headers=headers
            )
            assert reply.status == 202
            ids.add(reply.body["id"])
        assert len(ids) == 2  # one per token; the third request replayed the first


async def test_a_key_is_forgotten_after_its_window(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, {"server": {"idempotency_window": "300ms"}}) as daemon:
        first = await daemon.request("POST", "/v1/tasks", json={"type": "noop"}, headers=KEYED)
        deadline = time.monotonic() + 10
        while True:
            reply = await daemon.request("POST", "/v1/tasks", json={"type": "noop"}, headers=KEYED)
            if reply.body["id"] != first.body["id"]:
                break
            assert time.monotonic() < deadline, "the key was never forgotten"
            await asyncio.sleep(0.05)  # waiting for wall time to pass the window, bounded
        assert reply.status == 202
        assert "Idempotent-Replayed" not in reply.headers


async def test_a_bad_key_is_refused(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        reply = await daemon.request(
            "POST", "/v1/tasks", json={"type": "noop"}, headers={"Idempotency-Key": "x" * 256}
        )
        assert_error(reply, 422, "invalid", "Idempotency-Key")
        assert await daemon.count() == 0


async def test_a_batch_is_committed_in_order(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        tasks = [{"type": "noop", "payload": {"n": n}} for n in range(100)]
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
        assert reply.status == 202
        ids = reply.body["ids"]
        assert len(set(ids)) == 100
        for n, task_id in enumerate(ids):
            ended = await daemon.ended(task_id)
            assert (ended["state"], ended["payload"]) == ("succeeded", {"n": n})


async def test_a_batch_is_all_or_nothing(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        tasks: list[dict[str, object]] = [{"type": "noop"} for _ in range(5)]
        tasks[3] = {"type": "sleep", "payload": {"seconds": "soon"}}
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
        assert_error(reply, 422, "invalid", "tasks[3].payload.seconds")
        tasks[3] = {"type": "nope"}
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
        assert_error(reply, 422, "invalid", "tasks[3].type")
        assert await daemon.count() == 0


async def test_a_batch_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, {"workers": {"max_pending": 10}}) as daemon:
        tasks = [{"type": "sleep", "payload": {"seconds": 60}} for _ in range(11)]
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
        assert_error(reply, 503, "queue_full")
        assert int(reply.headers["Retry-After"]) >= 1
        assert await daemon.count() == 0
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks[:10]})
        assert reply.status == 202


async def test_a_batch_has_limits(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, {"server": {"max_batch": 3}}) as daemon:
        for size in (0, 4):
            tasks = [{"type": "noop"}] * size
            reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
            assert_error(reply, 422, "invalid", "tasks")
        assert await daemon.count() == 0


async def test_a_batch_replay_returns_the_same_tasks(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        body = {"tasks": [{"type": "noop", "payload": {"n": n}} for n in range(3)]}
        first = await daemon.request("POST", "/v1/tasks/batch", json=body, headers=KEYED)
        again = await daemon.request("POST", "/v1/tasks/batch", json=body, headers=KEYED)
        assert again.body["ids"] == first.body["ids"]
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await daemon.count() == 3


@pytest.mark.parametrize("field", ["queue", "callback", "type"])
async def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path, field: str) -> None:
    overrides = {"callbacks": {"billing": {"url": "http://127.0.0.1:9/hook"}}}
    async with open_daemon(tmp_path, overrides) as daemon:
        body = {"type": "noop", "payload": {}, field: "billing\n"}
        reply = await daemon.request("POST", "/v1/tasks", json=body)
        assert_error(reply, 422, "invalid", field)
        assert await daemon.count() == 0


# Valid JSON that Python cannot hold: a double past its range, an integer past 4,300 digits.
OUT_OF_RANGE = [
    b"9" * 299 + b"e20",
    b"-" + b"9" * 299 + b"." + b"9" * 299 + b"e10",
    b"1E+0000309",
    b"[" + b"9" * 310 + b".5]",
    b'{"a": [1, {"b": ' + b"9" * 4301 + b"}]}",
]


@pytest.mark.parametrize("number", OUT_OF_RANGE, ids=lambda n: n[:12].decode() + "...")
async def test_a_number_out_of_range_is_refused_at_submission(
    tmp_path: Path, number: bytes
) -> None:
    types = {"typed": {"kind": "python", "handler": "tests.test_submit:typed"}}
    async with open_daemon(tmp_path, {"types": types}) as daemon:
        untyped = b'{"type": "noop", "payload": ' + number + b"}"
        reply = await daemon.request("POST", "/v1/tasks", data=untyped, headers=JSON_BODY)
        assert reply.status == 422, reply.body
        assert reply.body["error"]["field"].startswith("payload")
        # A typed payload too, when the number sits in a field its type does not name.
        skipped = b'{"type": "typed", "payload": {"order": 1, "note": ' + number + b"}}"
        reply = await daemon.request("POST", "/v1/tasks", data=skipped, headers=JSON_BODY)
        assert reply.status == 422, reply.body
        batch = b'{"tasks": [{"type": "noop"}, {"type": "noop", "payload": ' + number + b"}]}"
        reply = await daemon.request("POST", "/v1/tasks/batch", data=batch, headers=JSON_BODY)
        assert reply.status == 422, reply.body
        assert reply.body["error"]["field"].startswith("tasks[1].payload")
        assert await daemon.count() == 0
        # What is within reach is taken and runs.
        near = b'{"type": "noop", "payload": [' + b"9" * 299 + b"e9, 1e-400]}"
        reply = await daemon.request("POST", "/v1/tasks", data=near, headers=JSON_BODY)
        assert reply.status == 202, reply.body
        assert (await daemon.ended(reply.body["id"]))["state"] == "succeeded"
