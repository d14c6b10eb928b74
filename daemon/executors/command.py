"""The `command` kind: run an argv list (never a shell) with the payload as JSON on stdin.

Environment: only PATH and LANG are taken from the daemon (PATH defaults to
`DEFAULT_PATH`), then the type's `env` table, then OFFLOAD_TASK_ID, OFFLOAD_TASK_TYPE and
OFFLOAD_ATTEMPT. Exit 0 succeeds: stdout is the result, parsed as JSON when it is JSON, else
text (empty: null); more than `max_output` bytes is drained, discarded and fails the task
permanently. stderr lines are logged with the task id, up to `max_output` bytes. A non-zero
exit is retried unless its code is in `permanent_exit_codes` (default 64-78, sysexits.h).

A spawn that fails because the daemon is short of file descriptors or processes waits and
tries again within the task's timeout (shortage.py).

Each run leads its own session and process group. However the run ends (exit, timeout,
cancel) nothing of the group outlives it: SIGTERM to the group, `kill_after` seconds for the
leader to exit and the pipes to close, then SIGKILL to the group, and members re-parented to
the daemon (when it is PID 1 or a subreaper) are reaped. A process that leaves the group
(setsid, setpgid) is out of reach; the unit's KillMode=mixed SIGKILLs it once the daemon has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import cast

import msgspec

from daemon.executors.base import JSON, Executor, Job, Permanent
from daemon.executors.shortage import Shortage, check_descriptors, when_possible

__all__ = ["SYSEXITS", "CommandFailed", "Shortage", "command_executor"]

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
INHERITED = ("PATH", "LANG")
RESERVED_PREFIX = "OFFLOAD_"
SYSEXITS = tuple(range(64, 79))  # EX_USAGE .. EX_CONFIG: bad input or setup, not bad luck

_CHUNK = 64 * 1024
_LINE = 4096  # longest stderr line logged as one record; longer ones are split
_TAIL = 200  # characters of the last stderr line quoted in a failure
_AFTER_KILL = 1.0  # seconds SIGKILL gets to take effect before we stop waiting
# Seconds to reap killed group members; with the default kill_after (5 s) and _AFTER_KILL a
# stopped run still unwinds within the drain's STOP_DEADLINE (10 s).
_REAP_DEADLINE = 3.0


class CommandFailed(Exception):
    """The program exited non-zero (or was killed by a signal): retryable."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def base_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a program inherits from the daemon: PATH and LANG, nothing else."""
    env = {key: environ[key] for key in INHERITED if key in environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def find_program(argv0: str, *, path: str, cwd: str | None) -> str | None:
    """Where exec finds `argv0` (a name looked up on `path`, or a path relative to `cwd`);
    None when it is missing or not executable."""
    if "/" in argv0:
        candidate = Path(cwd or ".") / argv0
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        return None
    return shutil.which(argv0, path=path)


def command_executor(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    max_output: int,
    permanent_exit_codes: Collection[int],
    kill_after: float,
) -> Executor:
    """Build the executor for one configured command. The environment is fixed here, once."""
    program = tuple(argv)
    fixed_env = {**base_environment(), **env}
    permanent = frozenset(permanent_exit_codes)

    async def run(job: Job) -> JSON:
        loop = asyncio.get_running_loop()
        child_env = {
            **fixed_env,
            "OFFLOAD_TASK_ID": job.task_id,
            "OFFLOAD_TASK_TYPE": job.type,
            "OFFLOAD_ATTEMPT": str(job.attempt),
        }
        transport, output = await when_possible(
            job,
            lambda: _spawn(
                loop,
                job,
                program,
                env=child_env,
                cwd=cwd,
                max_output=max_output,
                kill_after=kill_after,
            ),
        )
        try:
            try:
                _feed_stdin(transport, msgspec.json.encode(job.payload))
                await asyncio.shield(output.exited)
            finally:
                # Exit, timeout or cancel: nothing the program started may outlive the run.
                await _end_group(transport, output, kill_after)
        finally:
            transport.close()
            output.stderr.flush()
        return _outcome(transport.get_returncode(), output, max_output, permanent)

    return run


async def _spawn(
    loop: asyncio.AbstractEventLoop,
    job: Job,
    program: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    max_output: int,
    kill_after: float,
) -> tuple[asyncio.SubprocessTransport, _Output]:
    """Start the program in its own session and process group, its stdio piped to an
    `_Output`. A cancel while it starts lets it start, then ends its group."""

    async def start() -> tuple[asyncio.SubprocessTransport, _Output]:
        # The check and the descriptors the spawn makes are one step of the loop: no
        # connection accepted in between takes what the check found free.
        check_descriptors()
        return await loop.subprocess_exec(
            lambda: _Output(loop, job, max_output),
            *program,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own session and group: pgid == pid
        )

    spawn = asyncio.ensure_future(start())
    try:
        return await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # Cancelled while the spawn completed (a loaded machine): the program may run
        # already, and cancelling the spawn would kill its leader only, leaving the rest
        # of its group orphaned. Let it finish, then end the group as any run's end does.
        with contextlib.suppress(Exception):  # a spawn that failed left nothing to end
            transport, output = await spawn
            try:
                await _end_group(transport, output, kill_after)
            finally:
                transport.close()
        raise


def _feed_stdin(transport: asyncio.SubprocessTransport, payload: bytes) -> None:
    """Write the payload and close stdin; it is flushed in the background. A program may
    exit without reading it (`true`): then the pipe is already closed, which is no error."""
    stdin = cast(asyncio.WriteTransport | None, transport.get_pipe_transport(0))
    if stdin is None or stdin.is_closing():
        return
    try:
        stdin.write(payload)
        stdin.close()
    except (RuntimeError, BrokenPipeError, ConnectionResetError):
        pass  # uvloop raises RuntimeError on a transport the child's exit already closed


class _Output(asyncio.SubprocessProtocol):
    """One run's output as it arrives: stdout kept up to the cap and counted beyond it,
    stderr logged line by line. `exited` resolves once the leader is reaped; `finished` once
    it is and every pipe is closed, i.e. no process of the group holds them any more.
    Taking the data as it comes means a chatty program never blocks on a full pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, job: Job, cap: int) -> None:
        self.stdout = bytearray()
        self.dropped = 0
        self.cap = cap
        self.stderr = _StderrLog(job, cap)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 1:
            room = max(self.cap - len(self.stdout), 0)
            self.stdout += data[:room]
            self.dropped += len(data) - min(room, len(data))
        else:
            self.stderr.feed(bytes(data))

    def process_exited(self) -> None:
        _resolve(self.exited)

    def connection_lost(self, exc: Exception | None) -> None:
        _resolve(self.finished)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _StderrLog:
    """Logs each stderr line with the task's id until `cap` bytes were logged, then counts
    what it drops; keeps the last line to quote in a failure."""

    def __init__(self, job: Job, cap: int) -> None:
        self.job = job
        self.cap = cap
        self.pending = b""
        self.logged = 0
        self.dropped = 0
        self.last = ""

    def feed(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        while len(self.pending) > _LINE:
            lines.append(self.pending[:_LINE])
            self.pending = self.pending[_LINE:]
        for line in lines:
            self._line(line)

    def flush(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = b""
        if self.dropped:
            self.job.logger.warning(
                "stderr: %d more bytes not logged (over max_output)",
                self.dropped,
                extra={"event": "task.stderr_dropped"},
            )
            self.dropped = 0

    def _line(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text.strip():
            self.last = text[:_TAIL]
        if self.logged + len(line) > self.cap:
            self.dropped += len(line) + 1
            return
        self.logged += len(line) + 1
        self.job.logger.info("stderr: %s", text, extra={"event": "task.stderr"})


def _outcome(code: int | None, output: _Output, max_output: int, permanent: frozenset[int]) -> JSON:
    last = output.stderr.last
    if code != 0:
        if code is None:  # not reaped within _AFTER_KILL of SIGKILL; vanishingly rare
            raise CommandFailed("the program did not exit after SIGKILL", -1)
        if code < 0:
            what = f"was killed by {signal.Signals(-code).name}"
        else:
            what = f"exited with status {code}"
        message = f"{what}: {last}" if last else what
        if code in permanent:
            raise Permanent(message)
        raise CommandFailed(message, code)
    if output.dropped:
        size = len(output.stdout) + output.dropped
        raise Permanent(f"stdout is {size} bytes, over max_output ({max_output})")
    data = bytes(output.stdout)
    if not data.strip():
        return None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")


async def _end_group(
    transport: asyncio.SubprocessTransport, output: _Output, kill_after: float
) -> None:
    """SIGTERM the group; give the leader and every holder of the pipes `kill_after`
    seconds; SIGKILL what is left; reap members that were re-parented to us. A second
    cancel during the wait still gets the SIGKILL (the loop reaps the leader regardless)."""
    pgid = transport.get_pid()
    try:
        if _signal_group(pgid, signal.SIGTERM):
            await asyncio.wait({output.finished}, timeout=kill_after)
    finally:
        _signal_group(pgid, signal.SIGKILL)
    # Pipes held by a process that left the group never close: the caller closes them.
    await asyncio.wait({output.finished}, timeout=_AFTER_KILL)
    if output.exited.done():
        await _reap_group(pgid)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group (0: only look); False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def _reap_group(pgid: int) -> None:
    """Reap killed members of the group that are our children: that happens when the daemon
    is PID 1 or a child subreaper, so they were re-parented to it rather than to init. The
    leader is already reaped by the loop, so this never takes a status the loop waits for.
    No event announces these exits, hence the short poll; it runs only after SIGKILL."""
    deadline = time.monotonic() + _REAP_DEADLINE
    pause = 0.001
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)
        except ChildProcessError:
            # None of the group is our child yet. A member whose parent (also killed) has
            # not been reaped is re-parented to us only then: wait while the group lasts.
            if not _signal_group(pgid, 0):
                return
            pid = 0
        if pid:
            continue
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
