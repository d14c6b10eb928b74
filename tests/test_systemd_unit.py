"""offload under a real systemd: the units of systemd/, run the way operators run them.

One container per module (tests/systemd_harness.py): systemd 252 as PID 1, booted from the
host's own files with a tmpfs on top, offload installed under /opt/offload with the units
and a config in /etc/offload. Each test starts from stopped units and an empty state
directory, drives them with `systemctl`, and looks at what systemd, the journal, the store
and the HTTP API say. The container shares the host's network: HTTP goes over loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load
from daemon.http_server import SHUTDOWN_TIMEOUT
from daemon.lifecycle import STOP_SLACK
from daemon.workers import STOP_DEADLINE
from tests.harness import REPO_ROOT, TomlValue, free_port, render_toml
from tests.systemd_harness import (
    FIRST_RELEASE,
    RELEASES,
    UNIT_DIR,
    VENV,
    Accounts,
    Container,
    Service,
    boot_container,
    container_unavailable,
    install_offload,
    install_release,
    poll,
    release_venv,
    stored_tasks,
    switch_release,
    unix_get,
)

# Booting the container and installing into it run in the first test's setup.
pytestmark = pytest.mark.timeout(900)

DB = "/var/lib/offload/offload.db"  # in the unit's StateDirectory
UNIT_TEXT = (REPO_ROOT / "systemd" / "offload.service").read_text()
NO_EXEC_RELOAD = "ExecReload=" not in UNIT_TEXT
SECRET = "s3cr3t-in-a-payload"  # must never reach a log line
MAX_EXPOSURE = 2.0


def python_type(handler: str, **keys: TomlValue) -> dict[str, TomlValue]:
    return {"kind": "python", "handler": handler, **keys}


def config(
    service: Service,
    types: Mapping[str, Mapping[str, TomlValue]],
    *,
    workers: Mapping[str, TomlValue] | None = None,
    auth: Mapping[str, TomlValue] | None = None,
) -> str:
    """A config for the unit: the service's port, SQLite in the state directory."""
    tables: dict[str, Mapping[str, TomlValue]] = {
        "server": {"listen": service.listen},
        "store": {"url": f"sqlite://{DB}", "synchronous": "normal"},
        "workers": {"concurrency": 4, "grace_period": "1s", **(workers or {})},
        "auth": dict(auth or {}),
        "log": {"level": "info"},
    }
    for name, table in types.items():
        tables[f"types.{name}"] = table
    return render_toml(tables)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The module's container with offload installed; powered off at the end. Skips the
    tests that use it where no container can boot."""
    unavailable = container_unavailable()
    if unavailable is not None:
        pytest.skip(f"cannot boot a systemd container here: {unavailable}")
    booted = boot_container(tmp_path_factory.mktemp("container"))
    try:
        install_offload(booted)
        yield booted
    finally:
        booted.poweroff()


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture
def service(container: Container, port: int) -> Service:
    """offload.service from a clean slate (see `Service.reset`)."""
    svc = Service(container, port)
    svc.reset()
    return svc


@pytest.fixture
def accounts(container: Container) -> Iterator[Accounts]:
    """Users and groups a test makes in the container, removed after it."""
    made = Accounts(container)
    try:
        yield made
    finally:
        made.remove()


def ended(service: Service, task_id: str, within: float = 30.0) -> dict[str, Any]:
    """The task, once it is terminal (long-polls)."""

    def probe() -> dict[str, Any] | None:
        task = service.task(task_id, wait=5)
        return task if task["state"] in ("succeeded", "failed", "cancelled") else None

    return poll(probe, within=within, what=f"task {task_id} ending")


def drop_in_unit(drop_in: Path) -> str:
    """The unit a shipped drop-in is for, from its first line: the path to install it at."""
    first = drop_in.read_text().splitlines()[0]
    where = re.fullmatch(rf"# {UNIT_DIR}/(offload\.(?:service|socket))\.d/{drop_in.name}", first)
    assert where is not None, f"{drop_in.name}: the first line names its path, not {first!r}"
    return where.group(1)


def test_the_stop_timeout_covers_the_default_grace_and_the_shutdown_deadlines() -> None:
    timeout = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT_TEXT, re.MULTILINE)
    assert timeout is not None, "offload.service sets TimeoutStopSec in seconds"
    grace = load(REPO_ROOT / "config.example.toml").workers.grace_period
    # lifecycle.py: the stop takes at most grace + STOP_DEADLINE + SHUTDOWN_TIMEOUT +
    # STOP_SLACK, what the daemon asks systemd for (EXTEND_TIMEOUT_USEC) and the README says.
    assert int(timeout.group(1)) >= grace + STOP_DEADLINE + SHUTDOWN_TIMEOUT + STOP_SLACK


def test_units_pass_verify_and_security_scores_them_well(service: Service) -> None:
    ct = service.container
    units = [f"{UNIT_DIR}/offload.service", f"{UNIT_DIR}/offload.socket"]
    verified = ct.run("systemd-analyze", "verify", *units, check=False)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    security = ct.run("systemd-analyze", "security", "--offline=true", units[0], check=False)
    found = re.search(r"Overall exposure level for offload\.service: ([0-9.]+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout

    # The shipped drop-ins are valid too, each in the unit its first line names; together
    # they keep the score (static-user.conf gives up DynamicUser=, not the sandbox).
    for drop_in in sorted((REPO_ROOT / "systemd" / "drop-ins").glob("*.conf")):
        unit = drop_in_unit(drop_in)
        service.drop_in(unit, drop_in.stem, drop_in.read_text())
    verified = ct.run("systemd-analyze", "verify", *units, check=False)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    security = ct.run("systemd-analyze", "security", "--offline=true", units[0], check=False)
    found = re.search(r"Overall exposure level for offload\.service: ([0-9.]+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout


def test_start_returns_once_the_api_answers(service: Service) -> None:
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.service")
    # No retry: `systemctl start` waited for READY=1, which comes after the bind.
    assert service.http("GET", "/readyz").status == 200
    assert service.systemctl("is-active", "offload.service").stdout.strip() == "active"
    assert service.show("SubState") == "running"
    assert service.show("NRestarts") == "0"


def running_release(service: Service) -> str:
    """The venv whose interpreter runs the service's main process (the interpreter's path
    is the first word of its command line: the one in the `offload` script's #!)."""
    pid = service.show("MainPID")
    interpreter = service.container.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")[0]
    return interpreter.removesuffix("/bin/python")


def test_an_upgrade_is_a_venv_of_its_own_and_a_switch_of_the_link(service: Service) -> None:
    """The README's install and upgrade: each release in a venv of its own, /opt/offload/.venv
    (the unit's ExecStart=) a symlink switched from one to the next, then a restart."""
    ct = service.container
    assert ct.run("readlink", VENV).stdout.strip() == release_venv(FIRST_RELEASE)
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.service")
    assert running_release(service) == release_venv(FIRST_RELEASE)

    install_release(ct, "0.2.0")
    try:
        switch_release(ct, "0.2.0")
        assert running_release(service) == release_venv(FIRST_RELEASE)  # until the restart
        service.systemctl("restart", "offload.service")
        assert running_release(service) == release_venv("0.2.0")
        task = service.submit("noop", {})
        assert ended(service, task["id"])["state"] == "succeeded"
    finally:
        switch_release(ct, FIRST_RELEASE)
        ct.run("rm", "-rf", "/opt/offload/releases/0.2.0")
    service.systemctl("restart", "offload.service")  # a rollback is the same switch
    assert running_release(service) == release_venv(FIRST_RELEASE)


def test_a_bad_config_fails_the_start_once_and_is_not_restarted(service: Service) -> None:
    """Exit 78 from `serve` itself (there is no ExecStartPre=, whose 78 the unit would
    restart: RestartPreventExitStatus= looks at the main process only)."""
    service.write_config("[workers]\nconcurrency = 0\n")
    assert service.systemctl("start", "offload.service", check=False).returncode != 0

    def settled() -> bool | None:
        return service.show("ActiveState") == "failed" or None

    poll(settled, within=30, what="the unit failed")
    assert service.show("ExecMainStatus") == "78"
    assert service.show("NRestarts") == "0"
    assert service.journal("EVENT=config.invalid")


def test_tasks_run_and_journalctl_tells_the_story_of_each(service: Service) -> None:
    types = {
        "chatty": python_type("offload_test:chatty"),
        "fail": python_type("offload_test:fail", max_attempts=1),
    }
    service.write_config(config(service, types))
    service.systemctl("start", "offload.service")
    a = service.submit("chatty", {"lines": 3, "token": SECRET})["id"]
    b = service.submit("chatty", {"lines": 2})["id"]
    c = service.submit("fail", {})["id"]
    assert ended(service, a)["state"] == "succeeded"
    assert ended(service, b)["state"] == "succeeded"
    assert ended(service, c)["state"] == "failed"

    def story(task_id: str) -> list[dict[str, Any]] | None:
        # journald stores entries asynchronously: wait for the last line of the task.
        entries = service.journal(f"TASK_ID={task_id}")
        events = {e.get("EVENT") for e in entries}
        return entries if events & {"task.succeeded", "task.failed"} else None

    story_a = poll(lambda: story(a), within=10, what="the journal entries of task a")
    story_b = poll(lambda: story(b), within=10, what="the journal entries of task b")
    for task_id, entries, lines in ((a, story_a, 3), (b, story_b, 2)):
        assert {e["TASK_ID"] for e in entries} == {task_id}
        assert {(e["TASK_TYPE"], e["QUEUE"], e["ATTEMPT"]) for e in entries} == {
            ("chatty", "default", "1")
        }
        events = Counter(e.get("EVENT") for e in entries)
        assert events["task.succeeded"] == 1, entries
        assert len(entries) >= lines + 1, [
            e["MESSAGE"] for e in entries
        ]  # the handler's lines, then the outcome
        assert {e["_SYSTEMD_UNIT"] for e in entries} == {"offload.service"}
        assert {e["_TRANSPORT"] for e in entries} == {"journal"}  # native, not stderr

    poll(lambda: story(c), within=10, what="the journal entries of task c")
    problems = service.journal(priority="warning")
    assert all(int(e["PRIORITY"]) <= 4 for e in problems), problems
    problem_tasks = {e.get("TASK_ID") for e in problems}
    assert c in problem_tasks
    assert not problem_tasks & {a, b}

    everything = service.journal()
    assert not [e for e in everything if SECRET in str(e)], "a payload value was logged"


def test_stop_past_the_grace_is_clean_and_puts_tasks_back(service: Service) -> None:
    service.write_config(
        config(service, {"hold": python_type("offload_test:hold")}, workers={"grace_period": "1s"})
    )
    service.systemctl("start", "offload.service")
    release = uuid.uuid4().hex
    payload = {"release": f"{RELEASES}/{release}"}
    ids = {service.submit("hold", payload)["id"] for _ in range(3)}

    def all_running() -> bool | None:
        return True if {service.task(i)["state"] for i in ids} == {"running"} else None

    poll(all_running, within=15, what="three hold tasks running")

    started = time.monotonic()
    service.systemctl("stop", "offload.service")
    took = time.monotonic() - started
    assert took < 15, f"stop took {took:.1f}s"  # grace 1s + unwinding; TimeoutStopSec is 50s
    assert service.show("Result") == "success"
    assert service.show("ExecMainStatus") == "0"
    assert service.show("ActiveState") == "inactive"
    killing = [e for e in service.journal() if "Killing" in str(e.get("MESSAGE"))]
    assert killing == [], killing

    rows = stored_tasks(service.container, DB)
    assert {rows[i][0] for i in ids} == {"queued"}

    service.release(release)
    service.systemctl("start", "offload.service")
    assert {ended(service, i)["state"] for i in ids} == {"succeeded"}


def test_reload_applies_a_changed_type_and_refuses_a_broken_file(service: Service) -> None:
    noop = python_type("daemon.builtins:noop")
    service.write_config(
        config(service, {"noop": noop, "sleep": python_type("daemon.builtins:sleep")})
    )
    service.systemctl("start", "offload.service")
    main_pid = service.show("MainPID")

    service.write_config(
        config(service, {"noop": noop, "chatty": python_type("offload_test:chatty")})
    )
    service.systemctl("reload", "offload.service")

    def chatty_accepted() -> bool | None:
        body = {"type": "chatty", "payload": {"lines": 1}}
        return True if service.http("POST", "/v1/tasks", json_body=body).status == 202 else None

    poll(chatty_accepted, within=15, what="the added type accepted")
    removed = service.http("POST", "/v1/tasks", json_body={"type": "sleep", "payload": {}})
    assert removed.status == 422, removed.body

    # A broken file fails `systemctl reload` itself (ExecReload= checks it first), and the
    # daemon never hears of it.
    service.write_config("[workers\nconcurrency = ")
    refused = service.systemctl("reload", "offload.service", check=False)
    assert refused.returncode != 0
    assert not service.journal("EVENT=config.reload_refused")
    assert service.show("ActiveState") == "active"
    assert service.show("MainPID") == main_pid
    service.submit("chatty", {"lines": 1})
    service.submit("noop", None)
    removed = service.http("POST", "/v1/tasks", json_body={"type": "sleep", "payload": {}})
    assert removed.status == 422, removed.body


def test_a_wedged_event_loop_is_restarted_by_the_watchdog(service: Service) -> None:
    service.drop_in("offload.service", "watchdog", "[Service]\nWatchdogSec=5s\n")
    service.write_config(config(service, {"wedge": python_type("offload_test:wedge")}))
    service.systemctl("start", "offload.service")
    first_pid = service.show("MainPID")
    task_id = service.submit("wedge", {"seconds": 60})["id"]

    def restarted() -> str | None:
        pid = service.show("MainPID")
        active = service.show("ActiveState") == "active"
        return pid if active and pid not in (first_pid, "0") else None

    poll(restarted, within=30, what="a new main process after the watchdog fired")
    assert service.show("NRestarts") == "1"
    verdicts = service.journal("UNIT_RESULT=watchdog")
    assert verdicts, "systemd did not record a watchdog failure"
    # Attempt 1 wedged the loop and died with it; the restarted daemon ran attempt 2.
    task = ended(service, task_id)
    assert (task["state"], task["attempts"]) == ("succeeded", 2)


async def test_restart_under_load_with_the_socket_unit_refuses_no_connection(
    service: Service,
) -> None:
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.socket")
    service.systemctl("start", "offload.service")
    # The socket unit owns the port: a connection while the service is stopped starts it.
    service.systemctl("stop", "offload.service")
    assert service.http("GET", "/healthz").status == 200
    assert service.show("ActiveState") == "active"
    first_pid = service.show("MainPID")

    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def one_request() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return f"connect: {exc!r}"
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            status_line = await reader.readline()
            await reader.read()
            return status_line.decode(errors="replace").strip() or "no answer"
        except OSError as exc:
            return f"io: {exc!r}"
        finally:
            writer.close()

    async def client() -> None:
        while not stop.is_set():
            async with asyncio.timeout(30):
                outcomes[await one_request()] += 1

    async def answered(n: int) -> None:
        # The clients are tasks of this loop: look at the count between their requests.
        target = outcomes["HTTP/1.1 200 OK"] + n
        while outcomes["HTTP/1.1 200 OK"] < target:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async with asyncio.timeout(90):
        clients = [asyncio.create_task(client(), name=f"client-{i}") for i in range(8)]
        try:
            await answered(50)
            for _ in range(2):
                await asyncio.to_thread(service.systemctl, "restart", "offload.service")
                await answered(50)
        finally:
            stop.set()
            await asyncio.gather(*clients)

    assert service.show("MainPID") != first_pid
    assert service.show("NRestarts") == "0"  # restarts asked for, not failures
    failed_connects = {
        k: n for k, n in outcomes.items() if k == "refused" or k.startswith("connect")
    }
    assert failed_connects == {}, outcomes
    # What the issue asks: no refusal. A connection the stopping daemon itself had accepted
    # but not read a request from yet is closed unanswered or reset; that is counted in
    # `outcomes` and reported with issue 4, not asserted here.
    assert outcomes["HTTP/1.1 200 OK"] >= 150, outcomes


def test_tokens_come_from_a_systemd_credential(service: Service) -> None:
    ops, reader = "ops-" + uuid.uuid4().hex, "reader-" + uuid.uuid4().hex
    tokens = service.container.path("/etc/offload/tokens")
    tokens.write_text(f"ops admin {ops}\nreader read {reader}\n")
    tokens.chmod(0o600)  # root's: only the credential hands it to the dynamic user
    shipped = REPO_ROOT / "systemd" / "drop-ins" / "tokens-credential.conf"
    service.drop_in("offload.service", "tokens-credential", shipped.read_text())
    service.write_config(
        config(
            service,
            {"noop": python_type("daemon.builtins:noop")},
            auth={"credential": "offload-tokens"},
        )
    )
    service.systemctl("start", "offload.service")

    anonymous = service.http("GET", "/v1/tasks")
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert service.http("GET", "/readyz").status == 200  # an open path
    as_reader = {"Authorization": f"Bearer {reader}"}
    assert service.http("GET", "/v1/tasks", headers=as_reader).status == 200
    body = {"type": "noop", "payload": None}
    denied = service.http("POST", "/v1/tasks", json_body=body, headers=as_reader)
    assert denied.status == 403
    as_ops = {"Authorization": f"Bearer {ops}"}
    assert service.http("POST", "/v1/tasks", json_body=body, headers=as_ops).status == 202
    # Neither token reached the journal.
    assert not [e for e in service.journal() if ops in str(e) or reader in str(e)]


DROP_INS = REPO_ROOT / "systemd" / "drop-ins"
# The README's command for static-user.conf's user.
STATIC_USER_OPTIONS = ("--home-dir=/var/lib/offload",)


def shipped_value(drop_in: str, key: str) -> str:
    """The value of `key=` in a shipped drop-in (its last assignment)."""
    values: list[str] = re.findall(rf"^{key}=(.*)$", (DROP_INS / drop_in).read_text(), re.M)
    assert values, f"{drop_in} sets no {key}="
    return values[-1]


def test_a_static_user_lets_command_handlers_write_where_a_group_may(
    service: Service, accounts: Accounts
) -> None:
    """DynamicUser= cannot write a directory of an existing group even when it is named in
    ReadWritePaths=; static-user.conf (User=offload, SupplementaryGroups=) can, and the state
    directory the dynamic user made moves to the static user at the next start."""
    ct = service.container
    (shared,) = shipped_value("writable-paths.conf", "ReadWritePaths").split()
    (group,) = shipped_value("static-user.conf", "SupplementaryGroups").split()
    gid = int(ct.run("getent", "group", group).stdout.split(":")[2])
    # Setgid, as static-user.conf says: what handlers create there gets the group.
    ct.run("install", "-d", "-o", "root", "-g", group, "-m", "2775", shared)
    try:
        write = f'f={shared}/$OFFLOAD_TASK_ID; echo made > "$f"; id -u'
        types: dict[str, dict[str, TomlValue]] = {"thumb": {"kind": "command", "max_attempts": 1}}
        # argv, a list, after the last table (types.thumb): a JSON array is a TOML one.
        argv = json.dumps(["/bin/sh", "-ec", write])
        service.write_config(config(service, types) + f"argv = {argv}\n")
        service.drop_in(
            "offload.service", "writable-paths", (DROP_INS / "writable-paths.conf").read_text()
        )

        # The dynamic user: the path is writable, but not by it.
        service.systemctl("start", "offload.service")
        denied = ended(service, service.submit("thumb", None)["id"])
        assert denied["state"] == "failed"
        assert "Permission denied" in denied["last_error"], denied
        service.systemctl("stop", "offload.service")
        assert ct.run("readlink", "/var/lib/offload").stdout.strip() == "private/offload"

        uid = accounts.user("offload", *STATIC_USER_OPTIONS)
        service.drop_in(
            "offload.service", "static-user", (DROP_INS / "static-user.conf").read_text()
        )
        service.systemctl("start", "offload.service")
        assert (service.show("DynamicUser"), service.show("User")) == ("no", "offload")
        # systemd moved the state directory back out of /var/lib/private, to the user.
        state = ct.path("/var/lib/offload")
        assert not state.is_symlink()
        assert (state.stat().st_uid, state.stat().st_mode & 0o7777) == (uid, 0o750)
        assert {p.stat().st_uid for p in state.iterdir()} == {uid}
        assert not ct.path("/var/lib/private/offload").exists()
        assert service.task(denied["id"])["state"] == "failed"  # the store came along

        made = ended(service, service.submit("thumb", None)["id"])
        assert (made["state"], made["result"]) == ("succeeded", uid), made  # stdout, as JSON
        written = ct.path(f"{shared}/{made['id']}").stat()
        # The directory's group; readable by it (UMask=0027), not by others.
        assert (written.st_uid, written.st_gid, written.st_mode & 0o777) == (uid, gid, 0o640)
        as_group = ["setpriv", f"--reuid={group}", f"--regid={group}", "--init-groups"]
        assert ct.run(*as_group, "cat", f"{shared}/{made['id']}").stdout == "made\n"

        service.systemctl("stop", "offload.service")
        assert (service.show("Result"), service.show("ExecMainStatus")) == ("success", "0")
        killing = [e for e in service.journal() if "Killing" in str(e.get("MESSAGE"))]
        assert killing == [], killing
    finally:
        service.systemctl("stop", "offload.service", check=False)
        ct.run("rm", "-rf", shared)
        ct.run("rmdir", "--ignore-fail-on-non-empty", str(Path(shared).parent))


def test_a_unix_socket_admits_its_group_and_no_one_else(
    service: Service, accounts: Accounts
) -> None:
    ct = service.container
    group = shipped_value("unix-socket.conf", "SocketGroup")
    path = shipped_value("unix-socket.conf", "ListenStream")
    gid = accounts.group(group)
    accounts.user("offload-member", f"--groups={group}")
    accounts.user("offload-other")
    service.drop_in("offload.socket", "unix-socket", (DROP_INS / "unix-socket.conf").read_text())
    # No tokens: a unix socket is local, as loopback is (http_server.is_loopback).
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.socket")

    def socket_file() -> tuple[int, int, int]:
        st = ct.path(path).stat()
        return st.st_uid, st.st_gid, st.st_mode

    expected = (0, gid, stat.S_IFSOCK | 0o660)
    assert socket_file() == expected
    # A member's request starts the service, which serves the socket it was passed.
    assert unix_get(ct, path, "/healthz", user="offload-member") == "HTTP/1.1 200 OK"
    assert service.show("ActiveState") == "active"
    assert unix_get(ct, path, "/v1/tasks", user="offload-member") == "HTTP/1.1 200 OK"
    assert unix_get(ct, path, "/healthz", user="offload-other") == "EACCES"
    listening = f"listening on unix:{path}"
    assert [e for e in service.journal("EVENT=daemon.started") if listening in e["MESSAGE"]]
    with pytest.raises(ConnectionRefusedError):  # the drop-in replaced the TCP listener
        service.http("GET", "/healthz")

    # The service's restarts and stops leave the socket as it was (it is not in the
    # service's RuntimeDirectory=, which systemd chowns at start and removes at stop).
    service.systemctl("restart", "offload.service")
    assert socket_file() == expected
    assert unix_get(ct, path, "/healthz", user="offload-member") == "HTTP/1.1 200 OK"
    service.systemctl("stop", "offload.service")
    assert socket_file() == expected
    assert unix_get(ct, path, "/healthz", user="offload-member") == "HTTP/1.1 200 OK"
    assert unix_get(ct, path, "/healthz", user="offload-other") == "EACCES"

    since = f"--cursor={service.cursor}"
    socket_log = ct.run("journalctl", "--unit=offload.socket", since, "--output=cat").stdout
    assert "failed" not in socket_log, socket_log  # e.g. TCP_NODELAY on a unix socket
    service.systemctl("stop", "offload.socket", "offload.service")
    assert not ct.path(path).exists()  # RemoveOnStop=yes
