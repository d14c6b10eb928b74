"""The `command` executor against real processes: results, exit codes, caps, the environment,
payloads as data only, that nothing of a run's process group outlives it, and that a daemon
short of file descriptors delays a run rather than failing it."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from daemon.config import CommandType, parse
from daemon.errors import ConfigError
from daemon.executors.base import JSON, Executor, Job, Permanent, TaskLogger
from daemon.executors.command import SYSEXITS, CommandFailed, Shortage, command_executor
from daemon.tasktypes import build_types
from tests.harness import REPO_ROOT, DaemonConfig, Offload, eventually, free_port
from tests.inproc import open_daemon

PY = sys.executable
PR_SET_CHILD_SUBREAPER = 36

# Leader sh -> inner sh -> `sleep 60`; the sleep's pid is published once it runs.
TREE = """
{trap}
sh -c 'sleep 60 & echo $! > "$1.tmp" && mv "$1.tmp" "$1"; wait' inner "$1" &
wait
"""


def make_job(payload: JSON = None, *, task_id: str = "task-1", attempt: int = 1) -> Job:
    return Job(
        task_id=task_id,
        type="cmd",
        attempt=attempt,
        payload=payload,
        deadline=time.time() + 60,
        logger=TaskLogger(logging.getLogger("tests.command"), {"task_id": task_id}),
    )


def command(*argv: str, **settings: Any) -> Executor:
    options: dict[str, Any] = {
        "env": {},
        "cwd": None,
        "max_output": 64 * 1024,
        "permanent_exit_codes": SYSEXITS,
        "kill_after": 5.0,
    }
    options.update(settings)
    return command_executor(argv, **options)


def python(code: str, *args: str, **settings: Any) -> Executor:
    return command(PY, "-c", code, *args, **settings)


async def until(check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the reaper of orphaned descendants, as a daemon that is PID 1 is, so
    that a killed grandchild is re-parented to us rather than to an init that may not reap it;
    the executor must then reap it, or it stays a zombie and its group keeps existing."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


async def test_json_stdout_is_the_result() -> None:
    run = python("import json, sys; print(json.dumps({'got': json.load(sys.stdin)}))")
    assert await run(make_job({"n": 1, "s": "é"})) == {"got": {"n": 1, "s": "é"}}


async def test_other_stdout_is_a_string_and_empty_is_null() -> None:
    text = python("print('hello, world')")
    assert await text(make_job()) == "hello, world\n"
    silent = python("pass")
    assert await silent(make_job({"big": "x" * 1_000_000})) is None  # stdin never read


async def test_nonzero_exit_is_retryable_and_quotes_stderr() -> None:
    run = python("import sys; print('first', file=sys.stderr); sys.exit('boom: bad luck')")
    with pytest.raises(CommandFailed) as caught:
        await run(make_job())
    assert not isinstance(caught.value, Permanent)
    assert caught.value.returncode == 1
    assert "boom: bad luck" in str(caught.value)


async def test_death_by_signal_is_retryable() -> None:
    run = python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(CommandFailed) as caught:
        await run(make_job())
    assert caught.value.returncode == -9
    assert "SIGKILL" in str(caught.value)


async def test_sysexits_codes_are_permanent_by_default() -> None:
    for code in (64, 65, 78):
        with pytest.raises(Permanent):
            await python(f"raise SystemExit({code})")(make_job())
    with pytest.raises(CommandFailed):
        await python("raise SystemExit(79)")(make_job())


async def test_permanent_exit_codes_are_configurable() -> None:
    with pytest.raises(Permanent):
        await python("raise SystemExit(3)", permanent_exit_codes=(3,))(make_job())
    with pytest.raises(CommandFailed):
        await python("raise SystemExit(65)", permanent_exit_codes=(3,))(make_job())


async def test_stdout_over_max_output_is_drained_then_fails_permanently() -> None:
    at_cap = python("import sys; sys.stdout.write('x' * 1000)", max_output=1000)
    assert await at_cap(make_job()) == "x" * 1000
    over = python("import sys; sys.stdout.write('x' * 2_000_000)", max_output=1000)
    with pytest.raises(Permanent, match="2000000 bytes, over max_output"):
        await over(make_job())


async def test_a_flood_on_stderr_neither_blocks_nor_fails_the_run() -> None:
    run = python(
        "import sys; sys.stderr.write(('e' * 99 + '\\n') * 30_000); print('{\"ok\": 1}')",
        max_output=4096,
    )
    assert await run(make_job()) == {"ok": 1}


async def test_payload_metacharacters_reach_the_program_as_data(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    received = tmp_path / "stdin.bin"
    payload = {
        "cmd": f"$(touch {marker}); rm -rf {tmp_path}/nothing | cat && touch {marker}",
        "more": [f"`touch {marker}`", "'; \"", "\\", "\n", "${HOME}", "*"],
    }
    echo = python(
        "import sys; d = sys.stdin.buffer.read(); "
        "open(sys.argv[1], 'wb').write(d); sys.stdout.buffer.write(d)",
        str(received),
    )
    assert await echo(make_job(payload)) == payload
    assert received.read_bytes() == msgspec.json.encode(payload)
    assert not marker.exists()


async def test_environment_is_minimal_and_carries_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("DAEMON_SECRET", "must-not-leak")
    run = python(
        "import json, os; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))",
        env={"GREETING": "hi there"},
        cwd=str(tmp_path),
    )
    seen = await run(make_job(task_id="abc123", attempt=4))
    env = seen["env"]
    env.pop("LC_CTYPE", None)  # Python's own locale coercion may add it
    assert env == {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "GREETING": "hi there",
        "OFFLOAD_TASK_ID": "abc123",
        "OFFLOAD_TASK_TYPE": "cmd",
        "OFFLOAD_ATTEMPT": "4",
    }
    assert seen["cwd"] == str(tmp_path)


@pytest.mark.usefixtures("subreaper")
@pytest.mark.parametrize("ignores_term", [False, True], ids=["term", "kill"])
async def test_timeout_ends_the_whole_group(tmp_path: Path, ignores_term: bool) -> None:
    pidfile = tmp_path / "grandchild.pid"
    trap = "trap '' TERM" if ignores_term else ""
    run = command("/bin/sh", "-c", TREE.format(trap=trap), "sh", str(pidfile), kill_after=0.3)
    timeouts: list[asyncio.Timeout] = []

    async def like_the_consumer() -> JSON:
        async with asyncio.timeout(30) as timeout:
            timeouts.append(timeout)
            return await run(make_job())

    task = asyncio.create_task(like_the_consumer())
    await until(pidfile.exists)
    grandchild = int(pidfile.read_text())
    pgid = os.getpgid(grandchild)
    assert pgid != os.getpgid(0)
    timeouts[0].reschedule(asyncio.get_running_loop().time())  # the deadline is now
    with pytest.raises(TimeoutError):
        await task
    await until(lambda: group_gone(pgid))
    assert pid_gone(grandchild)


@pytest.mark.usefixtures("subreaper")
async def test_cancel_ends_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    run = command("/bin/sh", "-c", TREE.format(trap=""), "sh", str(pidfile))
    task = asyncio.ensure_future(run(make_job()))
    await until(pidfile.exists)
    grandchild = int(pidfile.read_text())
    pgid = os.getpgid(grandchild)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: group_gone(pgid))
    assert pid_gone(grandchild)


@pytest.mark.usefixtures("subreaper")
async def test_what_a_successful_program_leaves_behind_is_stopped(tmp_path: Path) -> None:
    pidfile = tmp_path / "leftover.pid"
    # The leftover holds stdout open: the run must not wait for it, nor let it live on.
    run = command(
        "/bin/sh", "-c", 'sleep 60 & echo $! > "$1"; echo \'{"done": true}\'', "sh", str(pidfile),
        kill_after=60.0,
    )  # fmt: skip
    started = time.monotonic()
    assert await run(make_job()) == {"done": True}
    assert time.monotonic() - started < 30  # SIGTERM did it; kill_after (60 s) was not needed
    leftover = int(pidfile.read_text())
    await until(lambda: pid_gone(leftover))


def test_config_reports_every_bad_command_key() -> None:
    raw = {
        "types": {
            "c": {
                "kind": "command",
                "argv": [],
                "env": {"bad-name": "x"},
                "permanent_exit_codes": [0, 300],
                "kill_after": "soon",
                "max_output": "lots",
                "shell": True,
            }
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    keys = [p.split(" ")[0].rstrip(":") for p in caught.value.problems]
    assert sorted(keys) == sorted(
        [
            "types.c.shell",
            "types.c.argv",
            "types.c.env.bad-name",
            "types.c.permanent_exit_codes",
            "types.c.kill_after",
            "types.c.max_output",
        ]
    )


def test_config_checks_program_cwd_and_reserved_names(tmp_path: Path) -> None:
    not_executable = tmp_path / "script"
    not_executable.write_text("#!/bin/sh\n")
    cases: dict[str, dict[str, Any]] = {
        "a": {"argv": ["no-such-program-4f1c"]},
        "b": {"argv": [str(not_executable)]},
        "c": {"argv": ["sh"], "cwd": str(tmp_path / "missing")},
        "d": {"argv": ["sh"], "env": {"OFFLOAD_TASK_ID": "forged"}},
    }
    raw = {"types": {name: {"kind": "command", **keys} for name, keys in cases.items()}}
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    keys = [p.split(" ")[0].rstrip(":") for p in caught.value.problems]
    assert sorted(keys) == [
        "types.a.argv[0]",
        "types.b.argv[0]",
        "types.c.cwd",
        "types.d.env.OFFLOAD_TASK_ID",
    ]


async def test_configured_type_runs_with_documented_defaults() -> None:
    config = parse({"types": {"echo": {"kind": "command", "argv": ["cat"]}}})
    tc = config.types["echo"]
    assert isinstance(tc, CommandType)
    assert tc.permanent_exit_codes == tuple(range(64, 79))
    assert (tc.max_output, tc.kill_after, tc.env, tc.cwd) == (65536, 5.0, {}, None)
    with ThreadPoolExecutor(1) as threads:
        types = build_types(config, threads)
    assert await types["echo"].executor(make_job([1, "two"])) == [1, "two"]


async def test_through_the_daemon_results_and_failures_land_on_the_task(tmp_path: Path) -> None:
    fast = {"max_attempts": 2, "backoff": {"initial": "10ms", "max": "10ms", "jitter": 0.0}}
    exits = "import json, sys; raise SystemExit(json.load(sys.stdin)['exit'])"
    types = {
        "echo": {"kind": "command", "argv": ["cat"]},
        "exits": {"kind": "command", "argv": [PY, "-c", exits], **fast},
    }
    async with open_daemon(tmp_path, {"types": types}) as daemon:
        echoed = await daemon.submit({"type": "echo", "payload": {"a": [1, 2]}})
        usage = await daemon.submit({"type": "exits", "payload": {"exit": 64}})
        flaky = await daemon.submit({"type": "exits", "payload": {"exit": 3}})
        echoed = await daemon.ended(echoed["id"])
        usage = await daemon.ended(usage["id"])
        flaky = await daemon.ended(flaky["id"])
    assert (echoed["state"], echoed["result"]) == ("succeeded", {"a": [1, 2]})
    assert (usage["state"], usage["attempts"]) == ("failed", 1)
    assert "exited with status 64" in usage["last_error"]
    assert (flaky["state"], flaky["attempts"]) == ("failed", 2)
    assert "CommandFailed: exited with status 3" in flaky["last_error"]


async def test_a_daemon_out_of_descriptors_delays_the_run_and_keeps_the_attempt(
    offload: Offload, tmp_path: Path
) -> None:
    """A real `offload serve` whose RLIMIT_NOFILE is lowered (prlimit) below the descriptors
    it holds, so the spawn of a command fails with EMFILE, then raised again."""
    port, db = free_port(), tmp_path / "offload.db"
    path = tmp_path / "offload.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f"[store]\nurl = {json.dumps(f'sqlite:///{db}')}\n"
        '[log]\nlevel = "info"\n'
        f'[types.echo]\nkind = "command"\nargv = ["cat"]\nmax_attempts = 1\ntimeout = "2m"\n'
    )
    url = f"http://127.0.0.1:{port}"
    daemon = await offload.start(DaemonConfig(path=path, url=url, db=db))
    # One connection, opened now and kept alive: a new one could not be accepted meanwhile.
    async with aiohttp.ClientSession(
        url, connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        async with http.get("/healthz") as reply:
            assert reply.status == 200
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (3, hard))  # 0-2 are taken
        try:
            async with http.post("/v1/tasks", json={"type": "echo", "payload": [42]}) as reply:
                assert reply.status == 202, await reply.text()
                task_id = (await reply.json())["id"]

            async def spawn_failed() -> str | None:
                log = daemon.log_text()
                for event in ("task.spawn_deferred", "task.failed", "task.retry"):
                    if f"event={event}" in log:
                        return event
                return None

            async with asyncio.timeout(30):
                assert await eventually(spawn_failed) == "task.spawn_deferred", daemon.log_tail()
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        async with http.get(f"/v1/tasks/{task_id}?wait=30") as reply:
            task = await reply.json()
    assert (task["state"], task["attempts"], task["result"]) == ("succeeded", 1, [42])
    assert task["last_error"] is None


# Run in a process of its own, whose RLIMIT_NOFILE it lowers: a run with `spare` descriptors
# free below the limit, its deadline 0.2 s away; prints what each ended with and whether
# the descriptors the process holds afterwards are the ones it held before.
SHORT_OF_DESCRIPTORS = """
import asyncio, json, logging, os, resource, time, uvloop
from daemon.executors.base import Job, TaskLogger
from daemon.executors.command import SYSEXITS, Shortage, command_executor

async def main():
    run = command_executor(["cat"], env={}, cwd=None, max_output=65536,
                           permanent_exit_codes=SYSEXITS, kill_after=5.0)
    def job(payload):
        return Job(task_id="t", type="cmd", attempt=1, payload=payload,
                   deadline=time.time() + 0.2, logger=TaskLogger(logging.getLogger("short"), {}))

    assert await run(job([])) == []  # the loop's own descriptors for children are made now
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    lowest_free = min(set(range(len(held) + 1)) - set(held))
    seen = []
    for spare in [*range(12), 16]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + spare, hard))
        try:
            ended = "ok" if await run(job([spare])) == [spare] else "wrong result"
        except Shortage:
            ended = "Shortage"
        except Exception as exc:
            ended = repr(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        now = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        seen.append([spare, ended, now == held])
    print(json.dumps(seen))

uvloop.run(main())
"""


async def test_a_spawn_short_of_descriptors_gives_up_at_the_deadline_and_leaks_none() -> None:
    """Every run ends as `Shortage` (retryable) or succeeds, and none leaves descriptors
    behind: uvloop keeps those of a spawn that fails half way, unless none is tried."""
    child = await asyncio.create_subprocess_exec(
        PY, "-c", SHORT_OF_DESCRIPTORS,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    seen = json.loads(out)
    assert all(kept for _, _, kept in seen), seen
    assert {ended for _, ended, _ in seen} <= {"Shortage", "ok"}, seen
    assert seen[0][1] == "Shortage"
    assert seen[-1][1] == "ok"
    assert not issubclass(Shortage, Permanent)
