"""The `offload` client commands as processes against a real `offload serve`: what they
print (JSON when piped, a table on a terminal), their exit codes, and the server's errors
shown as its message, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pty
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from daemon.client_cli import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_NOT_ENDED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from daemon.ids import is_id
from tests.harness import (
    READY_TIMEOUT,
    REPO_ROOT,
    Daemon,
    DaemonConfig,
    DaemonExited,
    Offload,
    TaskJson,
    TomlValue,
    daemon_env,
    eventually,
    free_port,
    read_rows,
    render_toml,
)

RUN_WITHIN = 60.0  # seconds for one command (most take ~1 s; --wait ones wait for a task)
TYPES = {
    "echo": "tests.clienthandlers:echo",
    "fail": "tests.clienthandlers:fail",
    "hold": "tests.clienthandlers:hold",
}
TOKEN = "cli-submitter-0123456789"
EX_START = 1  # `offload serve` could not start
ENOENT_TEXT = os.strerror(errno.ENOENT)
REFUSED_TEXT = os.strerror(errno.ECONNREFUSED)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(url: str, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in daemon_env().items() if k not in {"OFFLOAD_TOKEN", "OFFLOAD_URL"}}
    env["OFFLOAD_URL"] = url
    env["COLUMNS"] = "200"  # no truncated table rows
    if token is not None:
        env["OFFLOAD_TOKEN"] = token
    return env


async def offload_cli(
    *args: str, url: str, token: str | None = None, stdin: bytes | None = None
) -> Run:
    """Run `offload ARGS` with stdout and stderr piped; bounded by RUN_WITHIN."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        cwd=REPO_ROOT,
        env=cli_env(url, token),
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(RUN_WITHIN):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    run = Run(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in run.err, run.err
    return run


async def offload_on_terminal(*args: str, url: str) -> Run:
    """Run `offload ARGS` with stdout on a pseudo-terminal."""
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon",
            *args,
            cwd=REPO_ROOT,
            env=cli_env(url),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=follower,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(follower)
    try:
        async with asyncio.timeout(RUN_WITHIN):
            err = await proc.stderr.read() if proc.stderr is not None else b""
            code = await proc.wait()
        out = await asyncio.to_thread(read_all, leader)
    finally:
        os.close(leader)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Run(code, out.decode().replace("\r\n", "\n"), err.decode())


def read_all(fd: int) -> bytes:
    """What the ended process wrote to the terminal (EIO once it is all read)."""
    chunks = []
    for _ in range(1000):
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def start(
    offload: Offload, *, auth: Path | None = None, max_pending: int = 1000, toml: str = ""
) -> Daemon:
    """A ready daemon of TYPES (with `auth` as its tokens file, and `toml` appended to its
    config); on a fresh port if another process took the first between `free_port()` and
    the bind."""
    if auth is not None:
        toml += f'\n[auth]\ntokens_file = "{auth}"\n'
    for _ in range(3):
        workers = {"concurrency": min(4, max_pending), "max_pending": max_pending}
        config = offload.config(types=TYPES, workers=workers)
        with config.path.open("a", encoding="utf-8") as f:
            f.write(toml)
        daemon = await offload.start(config, ready=False)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await daemon.wait_ready()
        except DaemonExited:
            if daemon.returncode != EX_START:  # 1: could not bind (or lock the store)
                raise
            continue
        return daemon
    raise AssertionError("the port was taken 3 times")


@contextlib.contextmanager
def unix_socket_path() -> Iterator[Path]:
    """A path for a unix socket in a fresh directory, removed afterwards: under $TMPDIR, as
    pytest's tmp_path can be deeper than the 107 bytes a socket's path may have."""
    with tempfile.TemporaryDirectory(prefix="offload-") as directory:
        yield Path(directory) / "offload.sock"


async def start_on_unix(offload: Offload, sock: Path) -> Daemon:
    """A real `offload serve` of TYPES with `server.listen = "unix:SOCK"`, once /readyz
    answers 200 over that socket (the harness's readiness poll speaks TCP)."""
    db = offload.tmp_path / "unix.db"
    tables: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"unix:{sock}"},
        "store": {"url": f"sqlite:///{db}"},
        "workers": {"concurrency": 4},
        "log": {"level": "info"},
    }
    for name, handler in TYPES.items():
        tables[f"types.{name}"] = {"kind": "python", "handler": handler}
    path = offload.tmp_path / "unix.toml"
    path.write_text(render_toml(tables), encoding="utf-8")
    config = DaemonConfig(path=path, url=f"unix:{sock}", db=db)
    daemon = await offload.start(config, ready=False)
    connector = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=connector) as http:

        async def ready() -> bool | None:
            if daemon.returncode is not None:
                raise DaemonExited(
                    f"offload exited with {daemon.returncode}; log tail:\n{daemon.log_tail()}"
                )
            try:
                async with http.get("http://localhost/readyz") as resp:
                    return True if resp.status == 200 else None
            except aiohttp.ClientConnectionError:
                return None  # not bound yet

        async with asyncio.timeout(READY_TIMEOUT):
            await eventually(ready)
    return daemon


# -- submit ----------------------------------------------------------------------------


async def test_submit_prints_the_id_or_with_wait_the_result_and_exits_by_the_end(
    offload: Offload,
) -> None:
    daemon = await start(offload)
    url = daemon.url
    plain, result, failed, whole = await asyncio.gather(
        offload_cli("submit", "echo", "--payload", '{"text": "hi", "times": 2}', url=url),
        offload_cli("submit", "echo", "--payload", '{"text": "hi", "times": 2}', "--wait", url=url),
        offload_cli("submit", "fail", "--wait", url=url),
        offload_cli("submit", "echo", "--payload", '{"text": "x"}', "--wait", "--json", url=url),
    )

    assert (plain.code, plain.err) == (EXIT_OK, ""), plain
    task_id = plain.out.strip()
    assert is_id(task_id)
    assert plain.out == task_id + "\n"
    assert (await daemon.task(task_id)).type == "echo"

    assert (result.code, result.json(), result.err) == (EXIT_OK, {"echo": "hihi"}, "")

    assert failed.code == EXIT_FAILED, failed
    assert failed.out == ""
    assert "failed: Permanent: refused payload {}" in failed.err
    [failed_task] = await daemon.tasks(state="failed")
    assert failed_task.id in failed.err
    # The CLI's JSON is the API's, the times in `history` to the millisecond too.
    shown = await offload_cli("status", failed_task.id, "--json", url=url)
    served = json.loads((await daemon.request("GET", f"/v1/tasks/{failed_task.id}")).body)
    assert served["history"], served
    assert shown.json() == served

    task = whole.json()
    assert whole.code == EXIT_OK
    assert (task["state"], task["result"], task["payload"]) == (
        "succeeded",
        {"echo": "x"},
        {"text": "x"},
    )


async def test_payload_from_text_a_file_or_stdin_and_refusals(
    offload: Offload, tmp_path: Path
) -> None:
    daemon = await start(offload)
    url = daemon.url
    payload_file = tmp_path / "payload.json"
    payload_file.write_text('{"text": "file"}')
    from_file, from_stdin, not_json, no_file, invalid, unknown, no_type = await asyncio.gather(
        offload_cli("submit", "echo", "--payload", f"@{payload_file}", "--wait", url=url),
        offload_cli("submit", "echo", "--payload", "-", "--wait", url=url, stdin=b'{"text": "in"}'),
        offload_cli("submit", "echo", "--payload", "{text", url=url),
        offload_cli("submit", "echo", "--payload", f"@{tmp_path / 'absent.json'}", url=url),
        offload_cli("submit", "echo", "--payload", '{"text": 7}', url=url),
        offload_cli("submit", "nope", url=url),
        offload_cli("submit", url=url),
    )
    assert (from_file.code, from_file.json()) == (EXIT_OK, {"echo": "file"})
    assert (from_stdin.code, from_stdin.json()) == (EXIT_OK, {"echo": "in"})

    assert not_json.code == EXIT_USAGE
    assert "--payload is not JSON" in not_json.err
    assert no_file.code == EXIT_USAGE
    assert "absent.json" in no_file.err
    assert no_type.code == EXIT_USAGE  # argparse: the type is required

    assert (invalid.code, invalid.out) == (EXIT_REFUSED, "")
    assert invalid.err == "offload: invalid: Expected `str`, got `int` (field: payload.text)\n"
    assert unknown.code == EXIT_REFUSED
    assert "unknown task type 'nope'" in unknown.err
    assert "(field: type)" in unknown.err
    assert len(await daemon.tasks()) == 2  # the refused ones wrote nothing


async def test_a_replayed_submission_prints_the_same_id_and_says_so_on_stderr(
    offload: Offload,
) -> None:
    daemon = await start(offload)
    url = daemon.url
    args = ("submit", "echo", "--payload", '{"text": "once"}', "--delay", "1h")
    first = await offload_cli(*args, "--idempotency-key", "order-9", url=url)
    again = await offload_cli(*args, "--idempotency-key", "order-9", url=url)
    as_json = await offload_cli(*args, "--idempotency-key", "order-9", "--json", url=url)
    other = await offload_cli(*args, "--idempotency-key", "order-10", url=url)

    assert (first.code, first.err) == (EXIT_OK, ""), first
    task_id = first.out.strip()
    assert (again.code, again.out) == (EXIT_OK, first.out)
    assert again.err == (
        f"offload: replayed: task {task_id} was submitted before with this idempotency key; "
        "nothing new was created\n"
    )
    assert as_json.code == EXIT_OK
    assert as_json.err == again.err
    # The task as the API serves it: the replay is the answer's, not a field of the task.
    served = json.loads((await daemon.request("GET", f"/v1/tasks/{task_id}")).body)
    assert as_json.json() == served
    assert (other.code, other.err) == (EXIT_OK, "")
    assert other.out != first.out
    assert sorted(t.id for t in await daemon.tasks()) == sorted([task_id, other.out.strip()])


# -- status, cancel, retry ----------------------------------------------------------------


async def test_status_cancel_and_retry(offload: Offload, tmp_path: Path) -> None:
    daemon = await start(offload)
    url = daemon.url
    release = tmp_path / "release"
    submitted = await offload_cli(
        "submit", "hold", "--payload", json.dumps({"release": str(release)}), url=url
    )
    task_id = submitted.out.strip()

    shown = await offload_cli("status", task_id, url=url)
    assert shown.code == EXIT_OK
    assert shown.json()["id"] == task_id
    assert shown.json()["state"] in {"queued", "running"}
    gave_up = await offload_cli("status", task_id, "--wait", "--wait-timeout", "0.5", url=url)
    assert gave_up.code == EXIT_NOT_ENDED, gave_up
    assert f"task {task_id} has not ended after 0.5s" in gave_up.err

    waiting = asyncio.create_task(offload_cli("status", task_id, "--wait", url=url))
    cancelled = await offload_cli("cancel", task_id, url=url)
    assert (cancelled.code, cancelled.json()["state"]) == (EXIT_OK, "cancelled")
    waited = await waiting
    assert (waited.code, waited.json()["state"]) == (EXIT_CANCELLED, "cancelled")
    assert f"task {task_id} was cancelled" in waited.err

    again = await offload_cli("cancel", task_id, url=url)
    assert again.code == EXIT_REFUSED
    assert again.err == f"offload: conflict: task {task_id} already ended cancelled (field: id)\n"

    retried = await offload_cli("retry", task_id, url=url)
    assert (retried.code, retried.json()["state"]) == (EXIT_OK, "queued")
    release.touch()
    done = await offload_cli("status", task_id, "--wait", url=url)
    assert (done.code, done.json()["state"]) == (EXIT_OK, "succeeded")
    assert done.json()["result"] == {"released": True}
    # The CLI's JSON is the API's, times to the millisecond included.
    served = json.loads((await daemon.request("GET", f"/v1/tasks/{task_id}")).body)
    for field in ("created_at", "run_at", "started_at", "finished_at"):
        assert done.json()[field] == served[field], field
    not_again = await offload_cli("retry", task_id, url=url)
    assert not_again.code == EXIT_REFUSED
    assert "only failed or cancelled tasks can be retried" in not_again.err

    missing = await offload_cli("status", "01JD8X3K5Q9W2M7P4R6T0V1Y3Z", url=url)
    assert missing.code == EXIT_REFUSED
    assert missing.err == "offload: not_found: no task 01JD8X3K5Q9W2M7P4R6T0V1Y3Z (field: id)\n"


# -- list and stats --------------------------------------------------------------------


async def test_list_and_stats_write_json_when_piped_and_tables_on_a_terminal(
    offload: Offload,
) -> None:
    daemon = await start(offload)
    url = daemon.url
    later = [
        await offload_cli(
            "submit", "echo", "--payload", f'{{"text": "{n}"}}', "--delay", "1h", url=url
        )
        for n in range(3)
    ]
    ids = [run.out.strip() for run in later]
    assert (await offload_cli("submit", "fail", "--wait", url=url)).code == EXIT_FAILED
    [failed] = await daemon.tasks(state="failed")

    listed, only_failed, two_echo, too_few, stats = await asyncio.gather(
        offload_cli("list", url=url),
        offload_cli("list", "--state", "failed", url=url),
        offload_cli("list", "--type", "echo", "--limit", "2", url=url),
        offload_cli("list", "--limit", "0", url=url),
        offload_cli("stats", url=url),
    )
    assert listed.code == EXIT_OK
    assert [t["id"] for t in listed.json()] == [failed.id, *reversed(ids)]
    assert [t["id"] for t in only_failed.json()] == [failed.id]
    assert [t["id"] for t in two_echo.json()] == [ids[2], ids[1]]
    assert too_few.code == EXIT_USAGE

    assert stats.code == EXIT_OK
    counts = stats.json()
    assert counts["queues"]["default"] == {"queued": 3, "running": 0}
    assert counts["accepted"] == 4
    assert counts["since_start"]["failed"] == 1

    table, stats_table, forced_json = await asyncio.gather(
        offload_on_terminal("list", url=url),
        offload_on_terminal("stats", url=url),
        offload_on_terminal("list", "--json", url=url),
    )
    lines = table.out.splitlines()
    assert table.code == EXIT_OK
    assert lines[0].split() == [
        "ID",
        "TYPE",
        "QUEUE",
        "STATE",
        "ATTEMPTS",
        "CREATED",
        "LAST",
        "ERROR",
    ]
    assert [line.split()[0] for line in lines[1:]] == [failed.id, *reversed(ids)]
    assert lines[1].split()[1:5] == ["fail", "default", "failed", "1/3"]
    assert "Permanent: refused payload {}" in lines[1]
    assert stats_table.code == EXIT_OK
    rows = [line.split() for line in stats_table.out.splitlines()]
    assert rows[0] == ["QUEUE", "QUEUED", "RUNNING"]
    assert ["default", "3", "0"] in rows
    assert "accepted 4" in stats_table.out
    assert [t["id"] for t in json.loads(forced_json.out)] == [failed.id, *reversed(ids)]


# -- where and who ---------------------------------------------------------------------


async def test_url_token_and_the_servers_refusals(offload: Offload, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"submitter submit,read {TOKEN}\n")
    daemon = await start(offload, auth=tokens, max_pending=1)
    url = daemon.url
    dead = f"http://127.0.0.1:{free_port()}"
    hold = json.dumps({"release": str(tmp_path / "never")})
    anonymous, with_env, wrong_flag, unreachable, flag_over_env = await asyncio.gather(
        offload_cli("submit", "echo", "--payload", '{"text": "a"}', url=url),
        offload_cli("submit", "hold", "--payload", hold, url=url, token=TOKEN),
        offload_cli("list", "--token", "x" * 20, url=url, token=TOKEN),
        offload_cli("list", url=dead),
        offload_cli("list", "--url", url, url=dead, token=TOKEN),
    )
    assert anonymous.code == EXIT_REFUSED
    assert anonymous.err == (
        "offload: unauthorized: send Authorization: Bearer <token> (field: Authorization)\n"
    )
    assert with_env.code == EXIT_OK, with_env
    assert wrong_flag.code == EXIT_REFUSED  # --token wins over $OFFLOAD_TOKEN
    assert "the token is not valid" in wrong_flag.err
    assert unreachable.code == EXIT_UNREACHABLE
    assert f"cannot reach offload at {dead}" in unreachable.err
    assert flag_over_env.code == EXIT_OK  # --url wins over $OFFLOAD_URL (which is dead)
    assert isinstance(flag_over_env.json(), list)

    full = await offload_cli("submit", "echo", "--payload", '{"text": "b"}', url=url, token=TOKEN)
    assert full.code == EXIT_UNAVAILABLE
    assert full.err.startswith("offload: queue_full: ")
    assert "retry after " in full.err


async def test_the_commands_speak_to_a_unix_socket(offload: Offload, tmp_path: Path) -> None:
    """`--url`/`$OFFLOAD_URL` `unix:/path`, as the daemon's server.listen spells it: submit,
    wait (a long-poll), list; no socket there, or no listener on it, is exit 7."""
    release = tmp_path / "release"
    with unix_socket_path() as sock:
        daemon = await start_on_unix(offload, sock)
        url = f"unix:{sock}"
        held = await offload_cli(
            "submit", "hold", "--payload", json.dumps({"release": str(release)}), url=url
        )
        assert (held.code, held.err) == (EXIT_OK, ""), held
        held_id = held.out.strip()
        # --url over $OFFLOAD_URL, which names a dead port here.
        dead = f"http://127.0.0.1:{free_port()}"
        echo = ("submit", "echo", "--payload", '{"text": "u", "times": 2}', "--wait")
        echoed = await offload_cli(*echo, "--url", url, url=dead)
        assert (echoed.code, echoed.json(), echoed.err) == (EXIT_OK, {"echo": "uu"}, ""), echoed
        release.touch()
        waited = await offload_cli("status", held_id, "--wait", url=url)
        assert (waited.code, waited.json()["state"]) == (EXIT_OK, "succeeded"), waited
        assert waited.json()["result"] == {"released": True}
        listed = await offload_cli("list", url=url)
        assert listed.code == EXIT_OK, listed
        # What the list shows is what the daemon's store holds.
        states = {row.id: row.state for row in read_rows(daemon.config.db).values()}
        assert {t["id"]: t["state"] for t in listed.json()} == states
        assert sorted(t["type"] for t in listed.json()) == ["echo", "hold"]
        assert states[held_id] == "succeeded"

        absent = sock.parent / "absent.sock"
        stale = sock.parent / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(str(stale))  # a socket file that no one listens on: refused
            no_file, refused = await asyncio.gather(
                offload_cli("list", url=f"unix:{absent}"),
                offload_cli("submit", "echo", "--payload", '{"text": "x"}', url=f"unix:{stale}"),
            )
    assert no_file.code == EXIT_UNREACHABLE, no_file
    assert no_file.err == f"offload: cannot reach offload at unix:{absent}: {ENOENT_TEXT}\n"
    assert refused.code == EXIT_UNREACHABLE, refused
    assert refused.err == f"offload: cannot reach offload at unix:{stale}: {REFUSED_TEXT}\n"
    assert len(read_rows(daemon.config.db)) == 2


async def test_a_malformed_unix_url_is_a_usage_error() -> None:
    relative, two_slashes, empty = await asyncio.gather(
        offload_cli("list", url="unix:run/offload.sock"),
        offload_cli("list", url="unix://run/offload.sock"),
        offload_cli("list", "--url", "unix:", url="http://127.0.0.1:1"),
    )
    for run, url in (
        (relative, "unix:run/offload.sock"),
        (two_slashes, "unix://run/offload.sock"),
        (empty, "unix:"),
    ):
        assert (run.code, run.out) == (EXIT_USAGE, ""), run
        assert run.err == (
            f'offload: expected "unix:/absolute/path" (e.g. unix:/run/offload.sock), not {url!r}\n'
        )


# -- queues and schedules ----------------------------------------------------------------


async def api_queues(daemon: Daemon) -> dict[str, Any]:
    """GET /v1/queues, by name."""
    reply = await daemon.request("GET", "/v1/queues")
    assert reply.status == 200, (reply.status, reply.body)
    return {q["name"]: q for q in json.loads(reply.body)["queues"]}


async def ended(daemon: Daemon, task_id: str) -> TaskJson:
    """The task once it has ended (long-polls; callers bound the wait)."""

    async def probe() -> TaskJson | None:
        task = await daemon.task(task_id, wait=5)
        return task if task.state in {"succeeded", "failed", "cancelled"} else None

    return await eventually(probe)


async def test_pause_and_resume_a_queue_and_list_queues(offload: Offload) -> None:
    daemon = await start(offload)
    url = daemon.url
    paused = await offload_cli("pause", "queue", "low", url=url)
    assert (paused.code, paused.err) == (EXIT_OK, ""), paused
    assert paused.json()["name"] == "low"
    assert (paused.json()["paused"], paused.json()["configured"]) == (True, False)
    assert (await api_queues(daemon))["low"]["paused"] is True

    held = await offload_cli(
        "submit", "echo", "--payload", '{"text": "low"}', "--queue", "low", url=url
    )
    assert held.code == EXIT_OK, held
    held_id = held.out.strip()
    # A task submitted after it to another queue runs to its end: the feeder has claimed
    # since, and passed the paused queue's task by.
    passing = await offload_cli(
        "submit", "echo", "--payload", '{"text": "default"}', "--wait", url=url
    )
    assert (passing.code, passing.json()) == (EXIT_OK, {"echo": "default"})
    assert (await daemon.task(held_id)).state == "queued"

    listed = await offload_cli("queues", url=url)
    assert listed.code == EXIT_OK
    by_name = {q["name"]: q for q in listed.json()}
    assert (by_name["low"]["paused"], by_name["low"]["queued"]) == (True, 1)
    assert by_name["default"]["paused"] is False
    served = await api_queues(daemon)
    for name, queue in by_name.items():
        for field in ("paused", "configured", "queued", "running", "weight", "concurrency"):
            assert queue[field] == served[name][field], (name, field)

    table = await offload_on_terminal("queues", url=url)
    assert table.code == EXIT_OK
    rows = [line.split() for line in table.out.splitlines()]
    assert rows[0] == [
        "QUEUE",
        "PAUSED",
        "QUEUED",
        "RUNNING",
        "DONE/S",
        "WEIGHT",
        "CONCURRENCY",
        "RATE",
        "BURST",
        "CONFIGURED",
    ]
    [low] = [row for row in rows[1:] if row[0] == "low"]
    assert (low[1], low[2], low[3], low[-1]) == ("yes", "1", "0", "no")

    resumed = await offload_on_terminal("resume", "queue", "low", url=url)
    assert resumed.code == EXIT_OK, resumed
    assert ["paused:", "no"] in [line.split() for line in resumed.out.splitlines()]
    async with asyncio.timeout(RUN_WITHIN):
        done = await ended(daemon, held_id)
    assert (done.state, done.result) == ("succeeded", {"echo": "low"})
    # Not configured, not paused, nothing unfinished: the listing leaves it out.
    assert "low" not in await api_queues(daemon)

    wrong_kind, no_name, bad_name = await asyncio.gather(
        offload_cli("pause", "low", url=url),
        offload_cli("resume", "queue", url=url),
        offload_cli("pause", "queue", "a/b", url=url),
    )
    assert (wrong_kind.code, no_name.code) == (EXIT_USAGE, EXIT_USAGE)
    assert "invalid choice: 'low'" in wrong_kind.err
    assert bad_name.code == EXIT_REFUSED
    assert bad_name.err.startswith("offload: not_found: no queue 'a/b'")
    assert not [q for q in (await api_queues(daemon)).values() if q["paused"]]


# Rare fires: none should fall during a test.
SCHEDULES = """
[[schedules]]
name = "yearly"
cron = "30 2 1 1 *"
timezone = "Europe/Paris"
type = "echo"
payload = { text = "new year" }
queue = "reports"

[[schedules]]
name = "monthly"
cron = "0 0 1 * *"
type = "echo"
payload = { text = "month" }
"""


async def api_schedules(daemon: Daemon) -> dict[str, Any]:
    """GET /v1/schedules, by name."""
    reply = await daemon.request("GET", "/v1/schedules")
    assert reply.status == 200, (reply.status, reply.body)
    return {s["name"]: s for s in json.loads(reply.body)["schedules"]}


async def test_list_pause_and_resume_schedules(offload: Offload) -> None:
    daemon = await start(offload, toml=SCHEDULES)
    url = daemon.url
    listed = await offload_cli("schedules", url=url)
    assert listed.code == EXIT_OK, listed
    served = await api_schedules(daemon)
    # The CLI's JSON is the API's, times to the millisecond included.
    assert {s["name"]: s for s in listed.json()} == served
    yearly = served["yearly"]
    assert (yearly["cron"], yearly["timezone"], yearly["queue"]) == (
        "30 2 1 1 *",
        "Europe/Paris",
        "reports",
    )
    # A schedule first seen starts from its next fire: the one before counts as its last.
    assert yearly["paused"] is False
    assert yearly["last_fire"] < yearly["next_fire"]

    paused = await offload_cli("pause", "schedule", "yearly", url=url)
    assert (paused.code, paused.json()["paused"], paused.json()["next_fire"]) == (
        EXIT_OK,
        True,
        None,
    )
    after = await api_schedules(daemon)
    assert (after["yearly"]["paused"], after["monthly"]["paused"]) == (True, False)

    table = await offload_on_terminal("schedules", url=url)
    assert table.code == EXIT_OK
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "SCHEDULE",
        "PAUSED",
        "NEXT",
        "FIRE",
        "LAST",
        "FIRE",
        "TYPE",
        "QUEUE",
        "TIMEZONE",
        "CRON",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    # A paused schedule has no next fire.
    last_year = yearly["last_fire"]
    assert rows["yearly"][1:5] == ["yes", "-", last_year[:10], last_year[11:19] + "Z"]
    assert rows["yearly"][5:] == ["echo", "reports", "Europe/Paris", "30", "2", "1", "1", "*"]
    monthly = after["monthly"]
    assert rows["monthly"][1:4] == [
        "no",
        monthly["next_fire"][:10],
        monthly["next_fire"][11:19] + "Z",
    ]
    assert rows["monthly"][6:9] == ["echo", "-", "UTC"]

    resumed = await offload_cli("resume", "schedule", "yearly", url=url)
    assert (resumed.code, resumed.json()) == (EXIT_OK, (await api_schedules(daemon))["yearly"])
    assert resumed.json()["paused"] is False
    assert resumed.json()["next_fire"] == yearly["next_fire"]

    missing = await offload_cli("pause", "schedule", "weekly", url=url)
    assert missing.code == EXIT_REFUSED
    assert missing.err == "offload: not_found: no schedule 'weekly' is configured (field: name)\n"
