"""Harnesses for the tests of offload under a service manager (issue 4).

Outside systemd: `open_notify_socket()` binds a real AF_UNIX datagram socket (a path or an
abstract `@name`) that collects sd_notify messages, and `open_process()` runs a real
`offload serve` with the environment a service manager gives it (NOTIFY_SOCKET,
WATCHDOG_USEC, JOURNAL_STREAM, ...), which tests/harness.py scrubs on purpose.

Under systemd: `boot_container()` boots a real systemd as PID 1 of a systemd-nspawn
container made of the host's own files (read-only, a tmpfs overlay on top), and
`install_offload()` installs offload in it the way the README's "Install as a service"
does: a release's venv under /opt/offload/releases with /opt/offload/.venv a symlink to it,
the units of systemd/, a config in /etc/offload;
`Accounts` makes (and removes) the users and groups a test needs there, and `unix_get()` is
a local client running as one of them. Commands go in with nsenter (machinectl needs a
host systemd). Whatever is written inside vanishes at poweroff; the container's processes
live in cgroups of their own, which `poweroff()` empties and removes. Nothing here sleeps
to synchronise: waits are polls with deadlines.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import (
    READY_TIMEOUT,
    REAP_TIMEOUT,
    REPO_ROOT,
    Daemon,
    DaemonConfig,
    daemon_env,
    serve_argv,
)

T = TypeVar("T")

# -- sd_notify, outside systemd --------------------------------------------------------------


class NotifySocket:
    """A bound datagram socket playing the service manager's end of sd_notify. Every
    message received is kept in `messages`, in order, as a dict of its `KEY=value` lines."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self.address = address  # the value for $NOTIFY_SOCKET
        self.messages: list[dict[str, str]] = []

    async def receive(self) -> dict[str, str]:
        """The next message (callers bound the wait with `asyncio.timeout()`)."""
        data = await asyncio.get_running_loop().sock_recv(self._sock, 65536)
        message = parse_notify(data)
        self.messages.append(message)
        return message

    async def wait_for(self, key: str, value: str | None = None) -> dict[str, str]:
        """Receive until a message carries `key` (with `value`, if given) and return it."""
        while True:
            message = await self.receive()
            if key in message and (value is None or message[key] == value):
                return message

    def receive_nowait(self) -> list[dict[str, str]]:
        """Every message already waiting in the socket's buffer."""
        found: list[dict[str, str]] = []
        while True:
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            message = parse_notify(data)
            self.messages.append(message)
            found.append(message)


def parse_notify(data: bytes) -> dict[str, str]:
    """One sd_notify datagram: newline-separated `KEY=value` assignments."""
    message = {}
    for line in data.decode().split("\n"):
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"not an assignment in a notify message: {line!r}"
            message[key] = value
    return message


@contextmanager
def open_notify_socket(*, abstract: bool = False) -> Iterator[NotifySocket]:
    """A notify socket bound at a fresh path (short enough for sun_path), or at a fresh
    abstract name; closed and unlinked on exit."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    with sock, tempfile.TemporaryDirectory(prefix="offload-notify-") as directory:
        if abstract:
            name = f"offload-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = os.path.join(directory, "notify.sock")
            sock.bind(address)
        yield NotifySocket(sock, address)


RELOAD_TIMEOUT = 20.0  # seconds a SIGHUP gets to be answered with READY=1


async def reload(daemon: Daemon, notify: NotifySocket) -> str:
    """SIGHUP, then wait for the reload's READY=1; returns its STATUS=."""
    daemon.signal(signal.SIGHUP)
    async with asyncio.timeout(RELOAD_TIMEOUT):
        await notify.wait_for("RELOADING", "1")
        done = await notify.wait_for("READY", "1")
    return done.get("STATUS", "")


# -- a daemon with a service manager's environment ---------------------------------------------


@asynccontextmanager
async def open_process(
    config: DaemonConfig,
    log: Path,
    *,
    env: Mapping[str, str],
    wrapper: Sequence[str] = (),
    ready: bool = True,
) -> AsyncIterator[Daemon]:
    """Run `offload serve` on `config` with `env` added to the harness's environment, under
    `wrapper` (a command that execs its arguments, so the PID stays the daemon's), stdout and
    stderr into `log`. With `ready`, yield once /readyz answers 200. On exit the process is
    killed if it still runs and reaped, and the HTTP session closes."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as http:
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *wrapper,
                *serve_argv(config.path),
                cwd=REPO_ROOT,
                env={**daemon_env(), **env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        daemon = Daemon(config, proc, log, http)
        try:
            if ready:
                try:
                    async with asyncio.timeout(READY_TIMEOUT):
                        await daemon.wait_ready()
                except TimeoutError:
                    raise AssertionError(
                        f"offload not ready after {READY_TIMEOUT:g}s; log:\n{daemon.log_tail()}"
                    ) from None
            yield daemon
        finally:
            if daemon.returncode is None:
                daemon.kill()
            async with asyncio.timeout(REAP_TIMEOUT):
                await daemon.wait_exit()


# -- a real systemd in a container ---------------------------------------------------------------

BOOT_TIMEOUT = 60.0  # seconds for the container's systemd to reach its target
POWEROFF_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
POLL = 0.05
VENV = "/opt/offload/.venv"  # what the unit runs: a symlink to a release's venv
FIRST_RELEASE = "0.1.0"
RELEASES = "/opt/offload/release"  # files the `hold` test handler waits for
CONFIG = "/etc/offload/offload.toml"
UNIT_DIR = "/etc/systemd/system"
# Host units that have no business in a container sharing the host's network and files.
MASKED = (
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
)
CLEAN_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "SYSTEMD_PAGER=cat",
    "SYSTEMD_COLORS=0",
    "SYSTEMD_URLIFY=0",
)
# Task handlers for the tests, installed next to offload as the module `offload_test`.
TEST_HANDLERS = '''\
"""Task handlers of tests/test_systemd_unit.py (written there by tests/systemd_harness.py)."""

import asyncio
import os
import time


async def chatty(payload, job):
    """Log `lines` lines with the task's fields, then succeed."""
    for number in range(payload["lines"]):
        job.logger.info("step %d of %d", number + 1, payload["lines"])
    return {"attempt": job.attempt}


async def fail(payload, job):
    raise RuntimeError("this task always fails")


async def hold(payload, job):
    """Wait until the file `release` exists."""
    while not os.path.exists(payload["release"]):
        await asyncio.sleep(0.05)
    return {"attempt": job.attempt}


async def wedge(payload, job):
    """On the first attempt, block the event loop itself for `seconds`: the daemon stops
    answering, and so do its watchdog pings. Later attempts succeed at once."""
    if job.attempt == 1:
        time.sleep(payload["seconds"])
    return {"attempt": job.attempt}
'''


class ContainerError(RuntimeError):
    pass


class CommandFailed(AssertionError):
    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(argv)} exited with {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
        self.proc = proc


def container_unavailable() -> str | None:
    """Why this machine cannot boot a systemd container, or None if it can."""
    if platform.system() != "Linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (systemd-nspawn needs CAP_SYS_ADMIN)"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} (run .ci/install-systemd-deps)"
    if not any(Path(p).exists() for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")):
        return "no systemd installed on the host (run .ci/install-systemd-deps)"
    if not os.path.ismount("/sys/fs/cgroup"):
        return "/sys/fs/cgroup is not mounted"
    return None


def _cgroup_roots() -> list[Path]:
    """The hierarchies in which systemd-nspawn places the container: the unified one, and
    the named systemd one on a hybrid host."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.procs").exists():
        return [base]  # pure cgroup v2
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _namespace_pid1(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


@dataclass
class Container:
    """A booted container; build it with `boot_container()`, end it with `poweroff()`."""

    name: str
    nspawn: subprocess.Popen[bytes]
    console: Path
    cgroups: list[Path]
    leader: int = 0  # the container's PID 1, as the host sees it
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, inside: str) -> Path:
        """A path of the container's file system, as the host reaches it."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def run(
        self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside (every namespace, a clean environment); raise `CommandFailed`
        on a non-zero exit when `check`."""
        nsenter = ["nsenter", "--target", str(self.leader), "--all", "--root", "--wd", "--"]
        proc = subprocess.run(
            [*nsenter, "/usr/bin/env", "-i", *CLEAN_ENV, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc)
        return proc

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = "no manager yet"
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited during boot:\n{self.console_tail()}")
            if not self.leader:
                self.leader = next((c for c in _children(self.nspawn.pid) if _namespace_pid1(c)), 0)
            if self.leader:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
                if state in ("maintenance", "stopping"):
                    break
            time.sleep(POLL)  # another process boots: there is nothing to wait on but time
        raise ContainerError(f"boot did not finish (state {state}):\n{self.console_tail()}")

    def poweroff(self) -> None:
        """A clean poweroff (SIGTERM to nspawn), SIGKILL to the container's PID 1 if that
        does not end within POWEROFF_TIMEOUT, then every process left in our cgroups is
        killed and the cgroups removed."""
        if self.nspawn.poll() is None:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                if self.leader:
                    os.kill(self.leader, signal.SIGKILL)  # ends its whole PID namespace
                self.nspawn.kill()
                self.nspawn.wait(POWEROFF_TIMEOUT)
        _remove_cgroups(self.cgroups)


def _remove_cgroups(roots: list[Path]) -> None:
    """Kill what is left in these cgroup trees (all of it started by us) and remove them."""
    deadline = time.monotonic() + POWEROFF_TIMEOUT
    for root in roots:
        if not root.exists():
            continue
        while True:
            pids = {
                int(pid)
                for procs in root.rglob("cgroup.procs")
                for pid in procs.read_text().split()
            }
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(POLL)  # the kernel reaps them asynchronously
        for directory in sorted(
            (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            directory.rmdir()
        root.rmdir()


_LAUNCHER = """\
root=$1; shift
for cg in $OFFLOAD_TEST_CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done
exec unshare --mount --propagation private -- \\
    /bin/sh -c 'mount --bind / "$0" && exec systemd-nspawn "$@"' "$root" "$@"
"""


def boot_container(workdir: Path) -> Container:
    """Boot the host's own file system (read-only, with a tmpfs on top) as a container with
    systemd as PID 1, sharing the host's network; return once it reached basic.target.
    State lives in `workdir`; the container has its own cgroups, named after it."""
    name = f"offload-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root = workdir / "root"
    root.mkdir()
    console = workdir / "console.log"
    cgroups = [base / name for base in _cgroup_roots()]
    for cgroup in cgroups:
        cgroup.mkdir()
    args = [
        "--quiet",
        f"--directory={root}",
        "--volatile=overlay",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        f"--machine={name}",
        f"--hostname={name}",
        "--resolv-conf=copy-host",
        "--timezone=off",
        "--link-journal=no",
        # cgroup v2 inside (as on a Debian 12 host), and bpf() so IPAddressDeny= etc. work.
        "--system-call-filter=bpf",
        "--capability=CAP_BPF,CAP_PERFMON",
        "--",
        "systemd.unit=basic.target",
        "systemd.show_status=no",
        *(f"systemd.mask={unit}" for unit in MASKED),
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        "OFFLOAD_TEST_CGROUPS": " ".join(map(str, cgroups)),
    }
    started = time.monotonic()
    with console.open("wb") as out:
        nspawn = subprocess.Popen(
            ["/bin/sh", "-c", _LAUNCHER, "launcher", str(root), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    container = Container(name, nspawn, console, cgroups)
    try:
        container._wait_booted()
    except BaseException:
        container.poweroff()
        raise
    container.timings["boot"] = time.monotonic() - started
    return container


# -- offload installed in the container ------------------------------------------------------


def runtime_distributions(pyproject: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions offload needs at run time: the dependencies that
    pyproject.toml declares, and theirs, as this interpreter has them installed."""
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(declared)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            found[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ContainerError(
                f"{requirement.name} (needed by offload) is not installed in this venv: "
                f"re-run `make` so the venv matches pyproject.toml"
            ) from None
        todo += found[name].requires or []
    return list(found.values())


def release_venv(version: str) -> str:
    """Where the README installs release `version`."""
    return f"/opt/offload/releases/{version}/.venv"


def install_offload(container: Container, repo: Path = REPO_ROOT) -> None:
    """Install offload as the README does: release FIRST_RELEASE in a venv of its own
    (`install_release`), /opt/offload/.venv a symlink to it (`switch_release`), and the
    units of systemd/ in /etc/systemd/system."""
    started = time.monotonic()
    install_release(container, FIRST_RELEASE, repo)
    switch_release(container, FIRST_RELEASE)
    container.path(RELEASES).mkdir(mode=0o755)
    container.path("/etc/offload").mkdir(mode=0o755, exist_ok=True)
    for unit in ("offload.service", "offload.socket"):
        shutil.copyfile(repo / "systemd" / unit, container.path(f"{UNIT_DIR}/{unit}"))
    container.run("systemctl", "daemon-reload")
    container.timings["install"] = time.monotonic() - started


def install_release(container: Container, version: str, repo: Path = REPO_ROOT) -> None:
    """A venv at `release_venv(version)`, built from the container's python3, holding
    copies of this venv's dependencies and of the repo's `daemon` package, `offload_test`
    (the tests' task handlers) and an `offload` script, as pip would install them."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    theirs = container.run(
        "/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
    ).stdout.strip()
    if theirs != mine:
        raise ContainerError(
            f"the container's /usr/bin/python3 is {theirs}, the tests' venv is {mine}: the "
            f"venv's compiled dependencies would not load"
        )
    venv = release_venv(version)
    container.run("/usr/bin/python3", "-m", "venv", "--without-pip", venv)
    site_inside = f"{venv}/lib/python{mine}/site-packages"
    site = container.path(site_inside)
    for dist in runtime_distributions(repo / "pyproject.toml"):
        for file in dist.files or ():
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # scripts outside site-packages; bytecode is compiled below
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(dist.locate_file(file))), target)
    shutil.copytree(repo / "daemon", site / "daemon", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "offload_test.py").write_text(TEST_HANDLERS)
    # pip writes the venv's own interpreter into the script: the release's, not the link's.
    script = container.path(f"{venv}/bin/offload")
    script.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom daemon.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    # PYTHONDONTWRITEBYTECODE=1 in the unit: compile once here, or every start pays it.
    container.run(f"{venv}/bin/python", "-m", "compileall", "-q", "-j", "0", site_inside)


def switch_release(container: Container, version: str) -> None:
    """Point /opt/offload/.venv at release `version`'s venv, with the README's command."""
    container.run("ln", "-sfnT", release_venv(version), VENV)


def poll(probe: Callable[[], T | None], *, within: float, what: str) -> T:
    """Call `probe` until it returns something other than None, and return that; fail
    naming `what` after `within` seconds. For state kept by other processes (a unit, the
    journal, a daemon), which offers nothing to wait on."""
    deadline = time.monotonic() + within
    while (value := probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g}s")
        time.sleep(POLL)
    return value


# -- reading the container's state ---------------------------------------------------------------


def journal_entries(
    container: Container, *matches: str, after: str | None = None, priority: str | None = None
) -> list[dict[str, Any]]:
    """The journal entries of offload.service (and of systemd about it) matching `matches`
    (`FIELD=value`), after the cursor `after`, at `priority` or more urgent."""
    argv = ["journalctl", "--unit=offload.service", "--output=json", "--no-pager", "--quiet"]
    if after is not None:
        # Not --after-cursor: systemd 252 skips the first match after the cursor with it
        # when the cursor's own entry does not match. --cursor starts at the cursor's entry.
        argv.append(f"--cursor={after}")
    if priority is not None:
        argv.append(f"--priority={priority}")
    out = container.run(*argv, *matches).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if e["__CURSOR"] != after]


def journal_cursor(container: Container) -> str:
    """The cursor of the journal's last entry: later reads start after it."""
    out = container.run("journalctl", "--lines=0", "--show-cursor", "--quiet").stdout
    match = re.search(r"^-- cursor: (\S+)$", out, re.MULTILINE)
    assert match is not None, out
    return match.group(1)


_READ_ROWS = """\
import json, shutil, sqlite3, sys, tempfile
with tempfile.TemporaryDirectory() as tmp:
    for suffix in ("", "-wal"):
        try:
            shutil.copyfile(sys.argv[1] + suffix, tmp + "/db" + suffix)
        except FileNotFoundError:
            pass
    conn = sqlite3.connect(tmp + "/db")
    rows = conn.execute("SELECT id, state, attempts FROM tasks").fetchall()
    conn.close()
print(json.dumps({r[0]: [r[1], r[2]] for r in rows}))
"""


def stored_tasks(container: Container, db: str) -> dict[str, tuple[str, int]]:
    """id → (state, attempts) of every row of the SQLite file `db` in the container, read
    from a copy (the daemon's own files are never opened by someone else)."""
    out = container.run("/usr/bin/python3", "-c", _READ_ROWS, db).stdout
    return {task_id: (state, attempts) for task_id, (state, attempts) in json.loads(out).items()}


# -- accounts and local clients inside the container -------------------------------------------


class Accounts:
    """System users and groups a test makes in the container, removed by `remove()` (the
    container outlives the test: later tests must not find them)."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, name: str) -> int:
        """`groupadd --system NAME`; its gid."""
        self.container.run("groupadd", "--system", name)
        self.groups.append(name)
        return int(self.container.run("getent", "group", name).stdout.split(":")[2])

    def user(self, name: str, *options: str) -> int:
        """`useradd --system --user-group OPTIONS NAME` (no home made, no login shell unless
        OPTIONS say otherwise); its uid. Its own group goes with it at `remove()`."""
        self.container.run(
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell=/usr/sbin/nologin",
            *options,
            name,
        )
        self.users.append(name)
        return int(self.container.run("id", "-u", name).stdout)

    def remove(self) -> None:
        for name in reversed(self.users):
            self.container.run("userdel", name, check=False)
        for name in reversed(self.groups):
            self.container.run("groupdel", name, check=False)


_UNIX_GET = """\
import errno, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(60)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, repr(exc)))
    raise SystemExit(0)
request = f"GET {sys.argv[2]} HTTP/1.1\\r\\nHost: offload\\r\\nConnection: close\\r\\n\\r\\n"
sock.sendall(request.encode())
answer = b""
while chunk := sock.recv(65536):
    answer += chunk
print(answer.split(b"\\r\\n", 1)[0].decode())
"""


def unix_get(container: Container, socket_path: str, path: str, *, user: str) -> str:
    """GET `path` over the unix socket `socket_path`, from a process inside the container
    running as `user` with that user's groups (setpriv --init-groups): the status line of
    the answer, or the errno name of a connect that failed (e.g. "EACCES")."""
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    argv = [*as_user, "/usr/bin/python3", "-c", _UNIX_GET, socket_path, path]
    return container.run(*argv).stdout.strip()


# -- offload.service, driven like an operator does -----------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Service:
    """offload.service (and offload.socket) in `container`, listening on 127.0.0.1:`port`:
    configs and drop-ins written from the host, systemctl, journal reads, and HTTP from the
    host over loopback (the container shares the host's network)."""

    def __init__(self, container: Container, port: int) -> None:
        self.container = container
        self.port = port
        self.cursor = ""  # the journal's end when `reset()` ran

    def reset(self) -> None:
        """Both units stopped and their failures forgotten, no drop-in but the socket's
        port, no state, no release files, no tokens: each test starts from here."""
        run = self.container.run
        run("systemctl", "stop", "offload.socket", "offload.service")
        run("systemctl", "reset-failed", "offload.service", "offload.socket", check=False)
        for unit in ("offload.service", "offload.socket"):
            shutil.rmtree(self.container.path(f"{UNIT_DIR}/{unit}.d"), ignore_errors=True)
        run("rm", "-rf", "/var/lib/private/offload", "/var/lib/offload", "/etc/offload/tokens")
        for release in self.container.path(RELEASES).iterdir():
            release.unlink()
        self.drop_in(
            "offload.socket", "port", f"[Socket]\nListenStream=\nListenStream={self.listen}\n"
        )
        self.cursor = journal_cursor(self.container)

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def drop_in(self, unit: str, name: str, text: str) -> None:
        """Write /etc/systemd/system/UNIT.d/NAME.conf, then daemon-reload."""
        directory = self.container.path(f"{UNIT_DIR}/{unit}.d")
        directory.mkdir(exist_ok=True)
        (directory / f"{name}.conf").write_text(text)
        self.container.run("systemctl", "daemon-reload")

    def write_config(self, text: str) -> None:
        self.container.path(CONFIG).write_text(text)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl ARGS`; a failure reports the unit's latest journal lines."""
        proc = self.container.run("systemctl", *args, check=False)
        if check and proc.returncode != 0:
            tail = self.container.run(
                "journalctl", "--unit=offload.service", "--lines=30", "--no-pager", check=False
            ).stdout
            raise CommandFailed(["systemctl", *args], proc) from AssertionError(tail)
        return proc

    def show(self, prop: str, unit: str = "offload.service") -> str:
        return self.systemctl("show", f"--property={prop}", "--value", unit).stdout.strip()

    def journal(self, *matches: str, priority: str | None = None) -> list[dict[str, Any]]:
        """The unit's entries since `reset()` that match (see `journal_entries`)."""
        return journal_entries(self.container, *matches, after=self.cursor, priority=priority)

    def release(self, name: str) -> None:
        """Create the release file `name`, which `hold` tasks wait for."""
        self.container.path(f"{RELEASES}/{name}").touch()

    def http(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpReply:
        """One request on a new connection to 127.0.0.1:port (a blocking call: these tests
        drive an outside process and hold no event loop work meanwhile)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=COMMAND_TIMEOUT)
        try:
            sent = dict(headers or {})
            body = None
            if json_body is not None:
                body = json.dumps(json_body).encode()
                sent["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def submit(self, type_: str, payload: object) -> dict[str, Any]:
        reply = self.http("POST", "/v1/tasks", json_body={"type": type_, "payload": payload})
        assert reply.status == 202, (reply.status, reply.body)
        task: dict[str, Any] = reply.json()
        return task

    def task(self, task_id: str, *, wait: float = 0) -> dict[str, Any]:
        path = f"/v1/tasks/{task_id}" + (f"?wait={wait:g}" if wait else "")
        reply = self.http("GET", path)
        assert reply.status == 200, (reply.status, reply.body)
        task: dict[str, Any] = reply.json()
        return task
